"""Speculative decoding (docs/speculative.md): the verify plan, greedy equality, the sampled distribution, the CLI.

The trained fixture pairs of each family (a 4 x 128 target and a 2 x 64 draft trained on the same text, bytes as
tokens) are exported and split once per session; the targets with a verify plan of 4 drafts (5 rows).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES, heldout_bytes, run_cli

from rwkv2rknn.run.chain import Chain
from rwkv2rknn.run.sampling import Sampling, distribution
from rwkv2rknn.run.speculative import Speculator

FAMILIES = ["rwkv4", "rwkv7"]
K = 4
_OUT: dict = {}


def _out(tmp_path_factory, name: str, verify: int = 0, npu_io: str = "float16"):
    """The fixture `name` (e.g. rwkv7-tiny-draft) exported and split once per session."""
    from rwkv2rknn import families
    from rwkv2rknn.split import split_model

    key = (name, verify, npu_io)
    if key not in _OUT:
        root = tmp_path_factory.mktemp(f"spec-{name}-{verify}-{npu_io}")
        fam, w = families.load_checkpoint(FIXTURES / f"{name}.pth")
        fam.export(w, root / "model", dtype="float16", weights_as="constants", force=False, progress=False)
        split_model([root / "model"], root / "out", verify_tokens=verify, npu_io=npu_io, progress=False)
        _OUT[key] = root / "out"
    return _OUT[key]


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """family -> (target OUT with a verify plan, draft OUT)."""
    return lambda fam, npu_io="float16": (_out(tmp_path_factory, f"{fam}-tiny-trained", K, npu_io),
                                          _out(tmp_path_factory, f"{fam}-tiny-draft"))


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_rows_are_token_by_token(pairs, family):
    """Each row's logits and, after commit(j), the state are those of feeding the tokens one by one (fp32 buffers:
    the graph surgery alone, exact to float rounding); the next step after a commit continues from there."""
    target, _ = pairs(family, "float32")
    prompt = list(heldout_bytes(40, 3000))
    toks = list(heldout_bytes(K + 1, 3040))
    with Chain(target) as c:
        c.feed(prompt)
        base = c.get_state()
        seq_logits, seq_states = [], []
        for t in toks:
            seq_logits.append(np.array(c.step(t), dtype=np.float64))
            seq_states.append(c.get_state())
        for j in range(K + 1):
            c.set_state(base)
            rows = np.array(c.verify(toks), dtype=np.float64)
            assert rows.shape == (K + 1, 256)
            for i in range(K + 1):
                np.testing.assert_allclose(rows[i], seq_logits[i], rtol=0, atol=1e-4 * np.abs(seq_logits[i]).max())
            c.commit(j)
            for a, b in zip(c.get_state(), seq_states[j]):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(1.0, np.abs(b).max()))
            after = np.array(c.step(10), dtype=np.float64)
            c.set_state(seq_states[j])
            want = np.array(c.step(10), dtype=np.float64)
            np.testing.assert_allclose(after, want, rtol=0, atol=1e-4 * np.abs(want).max())
        # fewer tokens than rows: padded, and the rows given are still right
        c.set_state(base)
        rows = np.array(c.verify(toks[:2]), dtype=np.float64)
        np.testing.assert_allclose(rows[1], seq_logits[1], rtol=0, atol=1e-4 * np.abs(seq_logits[1]).max())
        with pytest.raises(ValueError):
            c.commit(2)  # only 2 real rows


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_speculative_equals_plain_greedy_256_tokens(pairs, family):
    """Must show: with the board's buffer dtypes under onnxruntime, 256 greedy tokens after a held-out prompt are
    the plain greedy tokens, and drafts were both accepted and rejected (so rollback happened)."""
    target, draft = pairs(family)
    prompt = list(heldout_bytes(64, 20000))
    with Chain(target) as t, Chain(draft) as d:
        logits, plain = t.feed(prompt), []
        for _ in range(256):
            plain.append(int(np.argmax(logits)))
            logits = t.step(plain[-1])
        spec = Speculator(t, d, K)
        spec.start(prompt)
        got = list(spec.generate(Sampling(0.0, 1.0), 256))
    assert got == plain
    st = spec.stats
    assert 0 < st.accepted < st.drafted, st  # some drafts kept, some rejected
    assert st.tokens == 256 and st.tokens_per_pass > 1.0


def _first_token_counts(target, draft, prompt, seeds: int, k: int, second: bool = False):
    """Counts of the first (or second) token speculative sampling gives after `prompt` over `seeds` seeds."""
    counts = np.zeros(256, dtype=np.int64)
    with Chain(target) as t, Chain(draft) as d:
        spec = Speculator(t, d, k)
        t.feed(prompt[:-1])  # both models after the prompt but its last token, which the first round feeds
        d.feed(prompt[:-1])
        t_state, d_state = t.get_state(), d.get_state()
        for seed in range(seeds):
            t.set_state(t_state)
            d.set_state(d_state)
            spec.pending, spec._todo, spec._round = prompt[-1], [], None
            spec.rng = np.random.default_rng(seed)
            toks: list[int] = []
            while len(toks) < (2 if second else 1):  # whole rounds: no limit, so the drafts are always checked
                toks += spec.round(Sampling(1.0, 1.0))
            counts[toks[1 if second else 0]] += 1
    return counts


def _target_probs(target, prompt, second: bool = False):
    """The plain target's distribution of the first token after `prompt` (or of the second, marginalized)."""
    with Chain(target) as t:
        logits = t.feed(prompt)
        p = distribution(np.array(logits, dtype=np.float64), 1.0, 1.0)
        if not second:
            return p
        state = t.get_state()
        out = np.zeros_like(p)
        for x in np.nonzero(p > 1e-7)[0]:
            t.set_state(state)
            out += p[x] * distribution(np.array(t.step(int(x)), dtype=np.float64), 1.0, 1.0)
        return out / out.sum()


def _chi_square_p(counts, probs) -> float:
    """Pearson's chi-square p-value, categories with expected count < 5 pooled into one."""
    from scipy.stats import chisquare

    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    ex = np.append(exp[big], exp[~big].sum())
    if ex[-1] < 5:  # fold a small pool into the smallest kept category
        obs, ex = obs[:-1], ex[:-1]
        obs[np.argmin(ex)] += counts[~big].sum()
        ex[np.argmin(ex)] += exp[~big].sum()
    return float(chisquare(obs, ex * obs.sum() / ex.sum()).pvalue)


PROMPT_OFFSET = 16000  # a held-out position where draft and target disagree (total variation 0.46, measured)
SEEDS = 3000
BUG_SEEDS = 1000  # measured: the wrong samplers below give p ~ 1e-22 and 1e-259 at 1,000 seeds


def _prompt():
    return list(heldout_bytes(48, PROMPT_OFFSET))


@pytest.fixture(scope="module")
def rwkv7_pair(pairs):
    return pairs("rwkv7")


def test_first_sampled_token_has_the_target_distribution(rwkv7_pair):
    """Must show: over 3,000 seeds, the first token speculative sampling gives after a prompt has the plain
    target's distribution (chi-square p > 0.001), though the draft's distribution is far from it."""
    target, draft = rwkv7_pair
    prompt = _prompt()
    p = _target_probs(target, prompt)
    q = _target_probs(draft, prompt)
    assert 0.5 * np.abs(p - q).sum() > 0.2  # the draft alone would be told apart
    counts = _first_token_counts(target, draft, prompt, SEEDS, K)
    assert _chi_square_p(counts, p) > 1e-3
    assert _chi_square_p(counts, q) < 1e-6  # the same test tells the draft's distribution apart


@pytest.mark.parametrize("bug", ["accept_always", "resample_from_target"])
def test_chi_square_rejects_a_wrong_sampler(rwkv7_pair, monkeypatch, bug):
    """The test above can fail: a sampler that keeps every draft, or that redraws from the target's distribution
    (not the residual) after a rejection, gives a distribution the same chi-square test rejects."""
    from rwkv2rknn.run import speculative

    if bug == "accept_always":
        monkeypatch.setattr(speculative, "accept_probability", lambda p, q: 1.0)
    else:
        monkeypatch.setattr(speculative, "residual", lambda p, q: p)
    target, draft = rwkv7_pair
    prompt = _prompt()
    counts = _first_token_counts(target, draft, prompt, BUG_SEEDS, K)
    assert _chi_square_p(counts, _target_probs(target, prompt)) < 1e-3


@pytest.mark.slow
def test_second_sampled_token_has_the_target_distribution(rwkv7_pair):
    """The second token (a kept draft's successor, a bonus token or the next round after a rollback) has the plain
    target's marginal distribution: k = 1 makes every round either a rejection or a bonus."""
    target, draft = rwkv7_pair
    prompt = _prompt()
    counts = _first_token_counts(target, draft, prompt, SEEDS, 1, second=True)
    assert _chi_square_p(counts, _target_probs(target, prompt, second=True)) > 1e-3


def test_truncate_goes_back_inside_a_round(pairs):
    """A stop inside a round keeps its first m tokens: the state is the one after them (greedy continues as if the
    round had produced only those)."""
    target, draft = pairs("rwkv4")
    prompt = list(heldout_bytes(32, 9000))
    with Chain(target) as t, Chain(draft) as d:
        spec = Speculator(t, d, K)
        spec.start(prompt)
        pol = Sampling(0.0, 1.0)
        first = []
        while True:
            first = spec.round(pol)
            if len(first) >= 3:
                break
        spec.truncate(2)
        rest = list(spec.generate(pol, 20))
        spec.start(prompt)
        whole = list(spec.generate(pol, 200))
    # the same greedy text: after truncation the kept two tokens are followed by what greedy gives after them
    text = whole
    kept = None
    for i in range(len(text) - 21):
        if text[i:i + 2] == first[:2] and text[i + 2:i + 22] == rest:
            kept = i
            break
    assert kept is not None


def test_run_cli_with_a_draft(pairs, tmp_path):
    target, draft = pairs("rwkv7")
    r = run_cli("--tokens", ",".join(map(str, heldout_bytes(40, 1000))), "--draft", draft, "--bench", "--json",
                "--max-tokens", "48", "--temperature", "0", target, module="rwkv2rknn.run")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["greedy_tokens_equal"] == 48
    assert 0 <= res["acceptance"] <= 1 and res["tokens_per_target_pass"] >= 1
    assert res["draft_ms_per_token"] > 0 and res["target_ms_per_token"] > 0 and res["speedup"] > 0
    r = run_cli(target, "--prompt", "def ", "--max-tokens", "30", "--draft", draft, "--draft-tokens", "2",
                "--seed", "1", "-q", module="rwkv2rknn.run")
    assert r.returncode == 0 and r.stdout.startswith("def "), r.stderr


@pytest.mark.parametrize("case", ["no_verify_plan", "other_vocab", "too_many", "without_draft"])
def test_run_cli_draft_errors(pairs, model_factory, tmp_path, case):
    target, draft = pairs("rwkv7")
    args = [target, "--tokens", "1,2,3", "--max-tokens", "4", "--draft", draft]
    if case == "no_verify_plan":
        args[0] = draft
    elif case == "other_vocab":
        from rwkv2rknn.split import split_model

        split_model([model_factory(layers=2, embd=64, vocab=300)], tmp_path / "o", prefill_chunk=0, progress=False)
        args[-1] = tmp_path / "o"
    elif case == "too_many":
        args += ["--draft-tokens", str(K + 1)]
    else:
        args = [target, "--tokens", "1,2,3", "--draft-tokens", "2"]
    r = run_cli(*args, module="rwkv2rknn.run")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_program_version_says_whether_it_has_a_verify_plan(pairs):
    from rwkv2rknn.program import load

    target, draft = pairs("rwkv4")
    pt, pd = load(target / "program.json"), load(draft / "program.json")
    assert pt.version == 2 and pt.verify.tokens == K + 1 and len(pt.verify.state_rows) == 4
    assert all(len(item["rows"]) == K for item in pt.verify.state_rows)
    assert pd.version == 1 and pd.verify is None
    assert "state_rows" not in json.loads((draft / "program.json").read_text())["plans"]["decode"]
