"""passes.verify: the verify graph over M rows equals M runs of the single-token graph, and its extra outputs hold
the state after every row (a layer of the project's first family, random weights)."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from passes_testlib import rel_err, session
from test_passes_batch import RWKV4_STATE, rwkv4_layer, run_tokens, single_session, warm_state

from passes.batch import BatchPlan
from passes.infra import PassResult
from passes.verify import row_output, verify_tokens

TOL = 1e-5


@pytest.mark.parametrize("m", [2, 5])
def test_verify_rows_hold_the_state_after_each_row(m):
    c = 64
    single = rwkv4_layer(c, "float32")
    result = verify_tokens(single, m, RWKV4_STATE)
    assert isinstance(result, PassResult) and result.modified
    assert len(result.notes) == 1 and isinstance(result.notes[0], BatchPlan)
    model = gs.export_onnx(result.graph)
    onnx.checker.check_model(model, full_check=True)
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    assert [row_output("state_out", r) for r in range(m - 1)] == [n for n in names if "@row" in n]

    rng = np.random.default_rng(3)
    state = warm_state(c, "float32", seed=4)
    tokens = rng.standard_normal((m, c)).astype(np.float32)
    got = dict(zip(names, sess.run(names, {"input": tokens, "state_in": state})))

    s = state
    for r in range(m):  # token by token: the state after each row
        (out, s) = run_tokens(single_session(c, "float32"), [{"input": tokens[r]}], s)
        assert rel_err(got["output"][r], out["output"][0]) < TOL, r
        held = got["state_out"] if r == m - 1 else got[row_output("state_out", r)]
        assert rel_err(held, s) < TOL, r


def test_verify_needs_a_draft_row():
    with pytest.raises(ValueError, match="at least 2 rows"):
        verify_tokens(rwkv4_layer(64, "float32"), 1, RWKV4_STATE)
