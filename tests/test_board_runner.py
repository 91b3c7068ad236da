"""The board path (`--backend rknn-lite`) against a stand-in rknnlite module.

rknn-toolkit-lite2 has no x86 wheel, so these tests put a small fake `rknnlite.api.RKNNLite` on
PYTHONPATH that answers like the real one (0 / -1 returns, None from a failed inference) and
computes each .rknn's segment with onnxruntime from the ONNX beside it. What they check is our side
of the contract: backend selection, the core mask, data_format, failure handling and the numbers
flowing through the chain. They do not check the board.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rwkv2rknn.build import build_manifest

from rwkv2rknn.verify import RUNTIME
from rwkv2rknn.split import split_model

pytestmark = pytest.mark.rknn
TOKENS = "5,17,200,3,99,42"

FAKE = '''
import json, os
from pathlib import Path
import numpy as np
import onnxruntime as ort

LOG = os.environ["FAKE_RKNNLITE_LOG"]


def _log(**kw):
    with open(LOG, "a") as f:
        f.write(json.dumps(kw) + "\\n")


class RKNNLite:
    NPU_CORE_AUTO, NPU_CORE_0, NPU_CORE_1, NPU_CORE_2 = 0, 1, 2, 4
    NPU_CORE_0_1, NPU_CORE_0_1_2 = 3, 7

    def __init__(self, verbose=False):
        self.sess = None

    def load_rknn(self, path):
        p = Path(path)
        if not p.exists():
            return -1
        onnx_path = p.parent.parent / "segments" / (p.name[:-len(".rknn")] + ".onnx")
        if not onnx_path.exists():  # calibration probes keep their ONNX under rknn/probes/
            onnx_path = p.parent / "probes" / (p.name[:-len(".rknn")] + ".onnx")
        self.sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.path = str(p)
        return 0

    def init_runtime(self, core_mask=0):
        _log(event="init", path=self.path, core_mask=core_mask)
        return int(os.environ.get("FAKE_INIT_RET", "0"))

    # rknn-toolkit-lite2 2.5.0's signature (read from its aarch64 wheel)
    def inference(self, inputs, data_type=None, data_format=None, inputs_pass_through=None, get_frame_id=False,
                  reuse_outputs=False):
        _log(event="infer", path=self.path, data_format=data_format, data_type=data_type,
             pass_through=inputs_pass_through, reuse_outputs=reuse_outputs, dtypes=[str(a.dtype) for a in inputs])
        if os.environ.get("FAKE_INFER_NONE"):
            return None
        if data_type is not None and any(str(a.dtype) != data_type for a in inputs):
            return None  # the real one logs "inputs[i].dtype ... is not same as data_type" and returns None
        specs = self.sess.get_inputs()
        # the board computes fp16: inputs as fp16 (the model's own dtype), outputs handed back as float32
        feed = {i.name: np.asarray(a).astype(np.float16).astype(np.float16 if "16" in i.type else np.float32)
                for i, a in zip(specs, inputs)}
        return [np.asarray(o).astype(np.float16).astype(np.float32) for o in self.sess.run(None, feed)]

    def release(self):
        self.sess = None
'''


@pytest.fixture(scope="module")
def built(model_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("board") / "out"
    split_model([model_factory(embd=128)], out, prefill_chunk=0, progress=False)
    build_manifest(out, runtime=RUNTIME, verify=False, progress=False)  # also builds the calibration probes
    fake = tmp_path_factory.mktemp("fake")
    (fake / "rknnlite").mkdir()
    (fake / "rknnlite" / "__init__.py").write_text("")
    (fake / "rknnlite" / "api.py").write_text(textwrap.dedent(FAKE))
    return out / "manifest.json", fake


def _run(manifest, fake, tmp_path, *args, **env):
    log = tmp_path / "rknnlite.log"
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]),
                    FAKE_RKNNLITE_LOG=str(log), **env)
    r = subprocess.run([sys.executable, "-m", "rwkv2rknn.run", str(manifest), "--tokens", TOKENS, "-q", *args],
                       capture_output=True, text=True, env=full_env)
    events = [__import__("json").loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return r, events


def test_rknn_lite_runs_every_npu_segment_with_the_core_mask(built, tmp_path):
    manifest, fake = built
    r, events = _run(manifest, fake, tmp_path, "--backend", "rknn-lite", "--core-mask", "0_1_2",
                     "--dump-logits", str(tmp_path / "lite.npy"))
    assert r.returncode == 0, r.stderr
    inits = [e for e in events if e["event"] == "init"]
    npu_rknn = {str(manifest.parent / "rknn")}
    assert inits and all(e["core_mask"] == 7 for e in inits)
    assert {str(Path(e["path"]).parent) for e in inits} == npu_rknn
    infers = [e for e in events if e["event"] == "infer"]
    assert infers and all(set(e["data_format"]) == {"nchw"} for e in infers)
    # fp16 buffers go in as they are: data_type float16, passed through, staging outputs reused
    assert all(e["data_type"] == "float16" and set(e["dtypes"]) == {"float16"} and set(e["pass_through"]) == {1}
               and e["reuse_outputs"] for e in infers)

    r2, _ = _run(manifest, fake, tmp_path, "--backend", "ort", "--dump-logits", str(tmp_path / "ort.npy"))
    assert r2.returncode == 0, r2.stderr
    a, b = np.load(tmp_path / "lite.npy"), np.load(tmp_path / "ort.npy")
    assert a.dtype == np.float32
    cos = float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cos >= 0.999 and int(a.argmax()) == int(b.argmax())


def test_auto_picks_rknn_lite_where_it_imports(built, tmp_path):
    manifest, fake = built
    r, events = _run(manifest, fake, tmp_path, "--backend", "auto")
    assert r.returncode == 0, r.stderr
    assert any(e["event"] == "infer" for e in events)


@pytest.mark.parametrize("env, words", [({"FAKE_INIT_RET": "-1"}, "init_runtime"),
                                        ({"FAKE_INFER_NONE": "1"}, "returned None")])
def test_board_runtime_failures_are_one_line_errors(built, tmp_path, env, words):
    manifest, fake = built
    r, _ = _run(manifest, fake, tmp_path, "--backend", "rknn-lite", **env)
    assert r.returncode == 2
    assert words in r.stderr and ".rknn" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_default_core_mask_is_each_segments_predicted_one(built, tmp_path):

    from rwkv2rknn.manifest import Manifest

    manifest, fake = built
    data = Manifest.load(manifest).data  # the plan joined with what the build made (build.json)
    graphs = data["graphs"] + data.get("prefill", {}).get("graphs", [])
    want = {str(manifest.parent / s["rknn"]): s["core_mask"] for g in graphs for s in g["segments"]
            if s["backend"] == "npu"}
    assert want and set(want.values()) <= {1, 7}
    r, events = _run(manifest, fake, tmp_path, "--backend", "rknn-lite")
    assert r.returncode == 0, r.stderr
    got = {e["path"]: e["core_mask"] for e in events if e["event"] == "init"}
    assert got == want


def test_calibrate_on_the_stand_in_writes_a_profile_estimate_uses(built, tmp_path):
    """What a board user runs: the probes and every segment timed, a TOML profile written, then estimate --board.
    The stand-in computes on the PC, so the figures describe this PC, not a board: the test checks the loop."""
    import json

    from rwkv2rknn.cost.profile import load_profile

    manifest, fake = built
    prof = tmp_path / "my-board.toml"
    r, events = _run(manifest, fake, tmp_path, "--backend", "rknn-lite", "--calibrate", str(prof))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "rwkv2rknn estimate" in r.stdout
    timed = {Path(e["path"]).name for e in events if e["event"] == "infer"}
    assert {"probe.add16.rknn", "probe.add262144.rknn", "probe.matmul1024.rknn"} <= timed
    profile = load_profile(prof)
    data = json.loads(manifest.read_text())
    ids = {s["id"] for g in data["graphs"] + data.get("prefill", {}).get("graphs", []) for s in g["segments"]}
    assert set(profile.measured_segments) == ids
    assert "measured on this board" in prof.read_text()
    est = subprocess.run([sys.executable, "-m", "rwkv2rknn", "estimate", str(manifest), "--board", str(prof),
                          "--json"], capture_output=True, text=True)
    assert est.returncode == 0, est.stderr
    result = json.loads(est.stdout.strip().splitlines()[-1])
    assert result["measured_ms_per_token"] > 0 and result["board"] == profile.name

    # off the board (ort) it refuses in one line and writes nothing
    r, _ = _run(manifest, fake, tmp_path, "--backend", "ort", "--calibrate", str(tmp_path / "x.toml"))
    assert r.returncode == 2 and "rknn-lite" in r.stderr and not (tmp_path / "x.toml").exists()
