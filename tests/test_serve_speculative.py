"""The server with a draft model (`python -m rwkv2rknn.serve OUT --draft DRAFT_OUT`): greedy requests give the text
plain serving gives (penalties, stop sequences inside a round, max_tokens, the state cache), under concurrent
clients too; the engine's counters show drafts were checked."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from conftest import FIXTURES, run_cli

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("uvicorn", reason="the server needs the serve extra")
openai = pytest.importorskip("openai", reason="the openai client is in the dev extra")

from benchmarks.serve import ServerProcess, references, request_specs, run_load  # noqa: E402


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    """(target OUT with a verify plan of 4 drafts, draft OUT): the trained RWKV-4 pair through the CLI."""
    root = tmp_path_factory.mktemp("serve-spec")
    made = []
    for name, extra in (("rwkv4-tiny-trained", ["--verify-tokens", "4"]), ("rwkv4-tiny-draft", [])):
        r = run_cli("export", FIXTURES / f"{name}.pth", "-o", root / name)
        assert r.returncode == 0, r.stderr
        r = run_cli("split", root / name, "-o", root / f"{name}-out", *extra)
        assert r.returncode == 0, r.stderr
        made.append(root / f"{name}-out")
    return tuple(made)


def _engine(target, draft=None, **kw):
    from rwkv2rknn.run.chain import Chain
    from rwkv2rknn.run.tokenizers import BytesTokenizer
    from rwkv2rknn.serve.engine import Engine
    from rwkv2rknn.serve.speculative import SpecEngine

    chain = Chain(target)
    if draft is None:
        return Engine(chain, BytesTokenizer(), **kw), [chain]
    d = Chain(draft)
    return SpecEngine(chain, BytesTokenizer(), d, 4, **kw), [chain, d]


def _run_jobs(engine, jobs_spec):
    """Submit all at once; wait; return [(content, finish, usage)] in order."""
    from rwkv2rknn.serve.engine import Job

    done = [None] * len(jobs_spec)
    events = [threading.Event() for _ in jobs_spec]

    def emit_for(i):
        def emit(kind, payload):
            if kind == "done":
                done[i] = (payload["content"], payload["finish_reason"], payload["usage"])
                events[i].set()
            elif kind == "error":
                done[i] = payload
                events[i].set()
        return emit

    for i, (prompt, params) in enumerate(jobs_spec):
        engine.submit(Job("generate", list(prompt), params, emit_for(i)))
    for e in events:
        assert e.wait(120)
    return done


def _specs():
    from rwkv2rknn.serve.sampling import GenParams

    prompts = [b"import os\nimport sys\n\n\ndef main(", b"class Parser:\n    def __init__(self", b"for item in ",
               b"    return self._", b"def read_config(path):\n    with open("]
    out = []
    for i, p in enumerate(prompts):
        out.append((p, GenParams(max_tokens=40 + 7 * i, temperature=0, presence_penalty=0, frequency_penalty=0)))
        out.append((p, GenParams(max_tokens=33, temperature=0)))  # the default penalties (look-ahead over drafts)
    out.append((prompts[0], GenParams(max_tokens=64, temperature=0, presence_penalty=0, frequency_penalty=0,
                                      stop=["):", "\n\n"])))  # a stop inside a round
    out.append((prompts[1], GenParams(max_tokens=1, temperature=0)))
    return out


def test_spec_engine_gives_plain_greedy_text_under_interleaving(outs):
    target, draft = outs
    specs = _specs()
    plain, chains = _engine(target, max_active=1)
    try:
        want = [_run_jobs(plain, [s])[0] for s in specs]  # alone, one by one
    finally:
        plain.close()
        for c in chains:
            c.close()
    spec, chains = _engine(target, draft, max_active=4, quantum=0.0005)  # interleaved: states swapped per turn
    try:
        got = _run_jobs(spec, specs)
        again = _run_jobs(spec, specs[:2])  # now from the state cache
        health = spec.health()
    finally:
        spec.close()
        for c in chains:
            c.close()
    for w, g in zip(want, got):
        assert not isinstance(g, Exception), g
        assert (g[0], g[1]) == (w[0], w[1])
        assert g[2]["completion_tokens"] == w[2]["completion_tokens"]
    assert [a[0] for a in again] == [w[0] for w in want[:2]]
    assert again[0][2]["prompt_tokens_details"]["cached_tokens"] > 0
    st = health["speculative"]
    assert st["verify_passes"] > 0 and 0 < st["accepted"] < st["drafted"] and st["tokens_per_target_pass"] > 1


def test_server_with_a_draft_under_concurrent_clients(outs, tmp_path):
    """8 clients x 2 requests against `serve OUT --draft DRAFT_OUT`: every text is the plain server's, alone."""
    target, draft = outs
    specs = request_specs(16, 24)
    with ServerProcess(target, "--model-name", "tiny", "--state-dir", tmp_path) as s:
        refs = references(s.url, "tiny", specs)
    with ServerProcess(target, "--model-name", "tiny", "--state-dir", tmp_path, "--draft", draft) as s:
        assert "draft" in s.stderr
        result = run_load(s.url, "tiny", specs, 8, 2, refs, request_timeout=60, deadline=180)
        assert s.alive()
    assert result["requests"] == 16 and result["failures"] == 0 and result["crosstalk"] == 0, result


def test_serve_draft_errors(outs, tmp_path):
    target, draft = outs
    r = run_cli(draft, "--draft", draft, "--port", "0", module="rwkv2rknn.serve", timeout=60)
    assert r.returncode == 2 and "verify plan" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli(target, "--draft-tokens", "2", "--port", "0", module="rwkv2rknn.serve", timeout=60)
    assert r.returncode == 2 and "--draft" in r.stderr, r.stderr
