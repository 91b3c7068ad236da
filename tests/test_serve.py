"""`python -m rwkv2rknn.serve`: the OpenAI-compatible server, tested as its users use it.

Splits of the trained fixtures (RWKV-4 and RWKV-7, bytes vocabulary) served on --backend ort, each server a child
process under tests/runtime_only.py (so the server imports no compiler module), on 127.0.0.1 on a free port.
Clients: the official `openai` package, raw HTTP for the malformed requests, headless Chromium for the page.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, TRAINED_PTH, run_cli

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/serve.py holds the server process and the load client
    sys.path.insert(0, str(ROOT))

openai = pytest.importorskip("openai", reason="the openai client is in the dev extra")
pytest.importorskip("uvicorn", reason="the server needs the serve extra")
pytest.importorskip("starlette", reason="the server needs the serve extra")

from benchmarks.serve import ServerProcess, make_client, references, request_specs, run_load  # noqa: E402

RUNTIME_ONLY = ROOT / "tests" / "runtime_only.py"
TRAINED7_PTH = FIXTURES / "rwkv7-tiny-trained.pth"


# -- fixtures: the splits and the servers -------------------------------------------------------------------------

def _export_split(root: Path, pth: Path) -> Path:
    model, out = root / "model", root / "out"
    r = run_cli("export", pth, "-o", model, timeout=600)
    assert r.returncode == 0, r.stderr
    r = run_cli("split", model, "-o", out, timeout=600)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def split4(tmp_path_factory) -> Path:
    """`rwkv2rknn export rwkv4-tiny-trained.pth -o model`, `rwkv2rknn split model -o out`."""
    return _export_split(tmp_path_factory.mktemp("serve4"), TRAINED_PTH)


@pytest.fixture(scope="module")
def split7(tmp_path_factory) -> Path:
    return _export_split(tmp_path_factory.mktemp("serve7"), TRAINED7_PTH)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    """Shared by the RWKV-4 and RWKV-7 servers: a state one saves is one the other must refuse."""
    return tmp_path_factory.mktemp("states")


LIMITS = ("--max-prompt-tokens", "512", "--max-tokens-limit", "1024")


@pytest.fixture(scope="module")
def srv4(split4, state_dir):
    with ServerProcess(split4, "--model-name", "tiny4", "--state-dir", state_dir, *LIMITS) as s:
        yield s


@pytest.fixture(scope="module")
def srv7(split7, state_dir):
    with ServerProcess(split7, "--model-name", "tiny7", "--state-dir", state_dir, *LIMITS) as s:
        yield s


@pytest.fixture(scope="module")
def servers(srv4, srv7):
    return {"rwkv4": (srv4, "tiny4"), "rwkv7": (srv7, "tiny7")}


def http(url: str, path: str, body=None, ctype: str | None = "application/json", method: str | None = None,
         key: str | None = None, timeout: float = 30) -> tuple[int, dict]:
    """A raw request (stdlib only): (status, JSON body)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": ctype} if ctype and data is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(server) -> dict:
    return http(server.url, "/health")[1]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def chat_text(client, model: str, messages: list, stream: bool, **kw):
    """(content, finish_reason, usage) of a chat completion through the openai client."""
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    text, finish, usage, chunks = "", None, None, 0
    for ch in client.chat.completions.create(model=model, messages=messages, stream=True,
                                             stream_options={"include_usage": True}, **kw):
        usage = ch.usage or usage
        for c in ch.choices:
            if c.delta.content:
                chunks += 1
                text += c.delta.content
            finish = c.finish_reason or finish
    assert chunks >= 1 or text == ""
    return text, finish, usage


def greedy_run(out: Path, prompt: str, max_tokens: int) -> str:
    """`python -m rwkv2rknn.run OUT --prompt P --temperature 0 --max-tokens N` (runtime only): the generated text."""
    r = subprocess.run([sys.executable, str(RUNTIME_ONLY), "rwkv2rknn.run", str(out), "--backend", "ort", "-q",
                        "--prompt", prompt, "--temperature", "0", "--max-tokens", str(max_tokens)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(prompt) and r.stdout.endswith("\n"), r.stdout
    return r.stdout[len(prompt):-1]


GREEDY = {"temperature": 0, "presence_penalty": 0, "frequency_penalty": 0}


def test_the_board_extra_includes_the_serve_extra():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["serve"] and set(extras["serve"]) <= set(extras["board"])
    assert {"openai", "playwright"} <= {r.split(">")[0].split("=")[0] for r in extras["dev"]}


# -- a real client ------------------------------------------------------------------------------------------------

def test_starts_on_loopback_and_says_it_has_no_authentication(srv4):
    assert srv4.url.startswith("http://127.0.0.1:")  # no --host given
    assert "NO AUTHENTICATION" in srv4.stderr and "--api-key" in srv4.stderr, srv4.stderr
    assert "backend ort" in srv4.stderr


@pytest.mark.parametrize("family", ["rwkv4", "rwkv7"])
def test_openai_client_completions_and_chat_streaming_and_not(servers, family):
    server, model = servers[family]
    client = make_client(server.url)
    assert [m.id for m in client.models.list()] == [model]
    prompt = "def read_config(path):\n"
    r = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
    text = r.choices[0].text
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("length", "stop") and text
    assert r.usage.prompt_tokens == len(prompt.encode()) and r.usage.completion_tokens <= 24
    streamed, finishes = "", []
    for ch in client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, stream=True):
        for c in ch.choices:
            streamed += c.text
            finishes.append(c.finish_reason)
    assert streamed == text and finishes[-1] == r.choices[0].finish_reason
    msgs = [{"role": "system", "content": "You write Python."}, user("Print hello")]
    a, fa, ua = chat_text(client, model, msgs, stream=False, max_tokens=32, temperature=0)
    b, fb, ub = chat_text(client, model, msgs, stream=True, max_tokens=32, temperature=0)
    assert (a, fa) == (b, fb) and fa in ("stop", "length")
    assert ua.prompt_tokens == len(b"System: You write Python.\n\nUser: Print hello\n\nAssistant:")
    assert ub.prompt_tokens == ua.prompt_tokens and ub.completion_tokens == ua.completion_tokens


@pytest.mark.parametrize("family", ["rwkv4", "rwkv7"])
def test_streamed_greedy_chat_equals_rwkv2rknn_run(servers, split4, split7, family):
    """Must show: the openai client streams a chat completion; with greedy sampling and penalties 0 its text is
    what `python -m rwkv2rknn.run OUT --prompt <the chat-formatted prompt> --temperature 0` writes."""
    server, model = servers[family]
    out = {"rwkv4": split4, "rwkv7": split7}[family]
    question, n = "What does the os module do?", 64
    text, finish, usage = chat_text(make_client(server.url), model, [user(question)], stream=True, max_tokens=n,
                                    **GREEDY)
    prompt = f"User: {question}\n\nAssistant:"
    assert usage.prompt_tokens == len(prompt.encode())
    generated = greedy_run(out, prompt, n)
    if "\n\n" in generated:  # the chat turn ends at the blank line (the template's turn separator)
        assert finish == "stop"
        generated = generated[:generated.index("\n\n")]
    else:
        assert finish == "length" and usage.completion_tokens == n
    expected = generated[1:] if generated.startswith(" ") else generated  # "Assistant: reply"
    assert text == expected and len(text) >= 5, (text, expected)


def test_stop_sequence_ends_generation_where_it_first_occurs(srv4):
    client = make_client(srv4.url)
    prompt = "import os\nimport sys\n\n\ndef main("
    full = client.completions.create(model="tiny4", prompt=prompt, max_tokens=64, temperature=0).choices[0].text
    assert len(full) > 20, full
    stop = full[10:13]
    cut = full.index(stop)
    for stream in (False, True):
        if stream:
            text, finish = "", None
            for ch in client.completions.create(model="tiny4", prompt=prompt, max_tokens=64, temperature=0,
                                                stop=[stop, "never-there"], stream=True):
                for c in ch.choices:
                    text += c.text
                    finish = c.finish_reason or finish
        else:
            r = client.completions.create(model="tiny4", prompt=prompt, max_tokens=64, temperature=0,
                                          stop=[stop, "never-there"])
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert (text, finish) == (full[:cut], "stop"), (stream, stop, full)


# -- the state cache ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["rwkv4", "rwkv7"])
def test_follow_up_turn_computes_only_its_new_tokens(servers, split4, split7, family):
    server, model = servers[family]
    client = make_client(server.url)
    first = [user(f"List the files in a directory ({family})")]
    a1, _, u1 = chat_text(client, model, first, stream=False, max_tokens=40, **GREEDY)
    assert u1.prompt_tokens_details.cached_tokens == 0
    second = [*first, {"role": "assistant", "content": a1}, user("Now sort them")]
    a2, _, u2 = chat_text(client, model, second, stream=True, max_tokens=40, **GREEDY)
    history = f"User: {first[0]['content']}\n\nAssistant: {a1.strip()}\n\n"
    new = "User: Now sort them\n\nAssistant:"
    assert u2.prompt_tokens == len((history + new).encode())
    assert u2.prompt_tokens_details.cached_tokens == len(history.encode())
    assert u2.prompt_tokens - u2.prompt_tokens_details.cached_tokens == len(new.encode())  # computed = new tokens
    # and the cached state is the right one: the same turn computed from scratch gives the same greedy text
    generated = greedy_run({"rwkv4": split4, "rwkv7": split7}[family], history + new, 40)
    generated = generated.split("\n\n")[0]
    assert a2 == (generated[1:] if generated.startswith(" ") else generated)


# -- no cross-talk, fairness, load ----------------------------------------------------------------------------

def _load(split, clients: int, per_client: int, max_tokens: int, tmp_path) -> dict:
    specs = request_specs(clients * per_client, max_tokens)
    with ServerProcess(split, "--model-name", "tiny", "--state-dir", tmp_path) as s:  # alone, one by one
        refs = references(s.url, "tiny", specs)
    with ServerProcess(split, "--model-name", "tiny", "--state-dir", tmp_path) as s:  # fresh: nothing cached
        result = run_load(s.url, "tiny", specs, clients, per_client, refs, request_timeout=60, deadline=240)
        h = health(s)
        assert s.alive()
    assert h["active"] == 0 and h["queued"] == 0 and h["errors"] == 0
    return result


def test_no_crosstalk_under_concurrent_clients(split4, tmp_path):
    """16 clients at once, 2 requests each (the full 16 x 8 is benchmarks/serve.py and the slow test below)."""
    r = _load(split4, 16, 2, 24, tmp_path)
    assert r["requests"] == 32 and r["failures"] == 0, r["failure_examples"]
    assert r["crosstalk"] == 0


@pytest.mark.slow
def test_load_16_clients_x_8_requests(split4, tmp_path):
    r = _load(split4, 16, 8, 32, tmp_path)
    assert r["requests"] == 128 and r["failures"] == 0 and r["crosstalk"] == 0, r


def test_a_short_request_is_not_stuck_behind_a_long_one(srv4):
    client = make_client(srv4.url)
    state = {"long_done": None, "chunks": 0}
    first = threading.Event()

    def long_request():
        stream = client.completions.create(model="tiny4", prompt="class Parser:\n", max_tokens=1024,
                                           temperature=1.0, stream=True)
        for _ in stream:
            state["chunks"] += 1
            first.set()
        state["long_done"] = time.perf_counter()

    t = threading.Thread(target=long_request)
    t.start()
    assert first.wait(30)
    r = client.completions.create(model="tiny4", prompt="x = ", max_tokens=4, temperature=0)
    short_done = time.perf_counter()
    t.join(60)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert state["long_done"] is not None and short_done < state["long_done"]  # served during the long one


def test_a_client_killed_mid_stream_leaves_the_server_healthy(srv4):
    before = health(srv4)
    code = ("import json, sys, urllib.request\n"
            "req = urllib.request.Request(sys.argv[1] + '/v1/completions', headers={'Content-Type': 'application/json'},"
            " data=json.dumps({'model': 'tiny4', 'prompt': 'def run(self):', 'max_tokens': 1024, 'stream': True,"
            " 'temperature': 1.0}).encode())\n"
            "with urllib.request.urlopen(req) as r:\n"
            "    for line in r:\n"
            "        print(line.decode().strip()[:20], flush=True)\n")
    child = subprocess.Popen([sys.executable, "-c", code, srv4.url], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().startswith("data: ")  # streaming has begun
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    deadline = time.monotonic() + 20
    while True:
        h = health(srv4)
        if h["cancelled"] > before["cancelled"] and h["active"] == 0:
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["completed"] == before["completed"] and h["errors"] == before["errors"]  # dropped, not run to the end
    r = make_client(srv4.url).completions.create(model="tiny4", prompt="x = ", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and srv4.alive()


# -- bad requests -------------------------------------------------------------------------------------------------

OK_COMPLETION = {"model": "tiny4", "prompt": "x = ", "max_tokens": 2}
BAD_REQUESTS = [
    # (case, method, path, body, content type, status)
    ("malformed JSON", "POST", "/v1/completions", b'{"model": "tiny4", "prompt": ', "application/json", 400),
    ("JSON that is not an object", "POST", "/v1/completions", b"[1, 2]", "application/json", 400),
    ("unknown model", "POST", "/v1/completions", {**OK_COMPLETION, "model": "gpt-4"}, "application/json", 404),
    ("missing model", "POST", "/v1/chat/completions", {"messages": [user("hi")]}, "application/json", 400),
    ("prompt over the limit", "POST", "/v1/completions", {**OK_COMPLETION, "prompt": "x" * 600}, "application/json",
     400),
    ("chat prompt over the limit", "POST", "/v1/chat/completions",
     {"model": "tiny4", "messages": [user("y" * 600)]}, "application/json", 400),
    ("negative max_tokens", "POST", "/v1/completions", {**OK_COMPLETION, "max_tokens": -1}, "application/json", 400),
    ("zero max_tokens", "POST", "/v1/completions", {**OK_COMPLETION, "max_tokens": 0}, "application/json", 400),
    ("huge max_tokens", "POST", "/v1/completions", {**OK_COMPLETION, "max_tokens": 10**9}, "application/json", 400),
    ("max_tokens not a number", "POST", "/v1/completions", {**OK_COMPLETION, "max_tokens": "ten"},
     "application/json", 400),
    ("token id out of range", "POST", "/v1/completions", {**OK_COMPLETION, "prompt": [104, 105, 256]},
     "application/json", 400),
    ("negative token id", "POST", "/v1/completions", {**OK_COMPLETION, "prompt": [-1, 5]}, "application/json", 400),
    ("empty prompt", "POST", "/v1/completions", {**OK_COMPLETION, "prompt": ""}, "application/json", 400),
    ("wrong content type", "POST", "/v1/completions", json.dumps(OK_COMPLETION).encode(), "text/plain", 415),
    ("form data", "POST", "/v1/chat/completions", b"model=tiny4", "application/x-www-form-urlencoded", 415),
    ("unknown role", "POST", "/v1/chat/completions", {"model": "tiny4", "messages": [{"role": "wizard",
                                                                                      "content": "hi"}]},
     "application/json", 400),
    ("no messages", "POST", "/v1/chat/completions", {"model": "tiny4", "messages": []}, "application/json", 400),
    ("temperature out of range", "POST", "/v1/completions", {**OK_COMPLETION, "temperature": 7}, "application/json",
     400),
    ("stream not a boolean", "POST", "/v1/completions", {**OK_COMPLETION, "stream": "yes"}, "application/json", 400),
    ("unknown route", "GET", "/v1/engines", None, None, 404),
    ("wrong method", "GET", "/v1/completions", None, None, 405),
    ("state of the wrong shapes (saved by the RWKV-7 server)", "POST", "/v1/state/load", {"name": "from-rwkv7"},
     "application/json", 400),
    ("no such state", "POST", "/v1/state/load", {"name": "never-saved"}, "application/json", 404),
    ("state name with a path", "POST", "/v1/state/save", {"name": "../escape", "prompt": "x"}, "application/json",
     400),
]


@pytest.fixture(scope="module")
def rwkv7_state(srv7, state_dir):
    status, body = http(srv7.url, "/v1/state/save", {"name": "from-rwkv7", "prompt": "import numpy"})
    assert status == 200 and body["tokens"] == len(b"import numpy"), body
    return state_dir / "from-rwkv7.npz"


@pytest.mark.parametrize("case,method,path,body,ctype,status", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_an_openai_style_error_and_the_server_goes_on(srv4, rwkv7_state, case, method, path, body,
                                                                      ctype, status):
    got, err = http(srv4.url, path, body, ctype, method=method)
    assert got == status, (case, err)
    assert isinstance(err["error"]["message"], str) and err["error"]["message"]
    assert err["error"]["type"] == "invalid_request_error"
    assert set(err["error"]) == {"message", "type", "param", "code"}
    ok, r = http(srv4.url, "/v1/completions", OK_COMPLETION)
    assert ok == 200 and r["choices"][0]["finish_reason"] == "length"


def test_bad_requests_raise_the_openai_clients_own_errors(srv4):
    client = make_client(srv4.url)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny4", prompt="x", max_tokens=-5)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny4", messages=[user("z" * 600)], max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"


# -- saved states, --api-key --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed(split4, state_dir):
    """A second RWKV-4 server with --api-key, sharing the state directory (its cache starts empty)."""
    s = ServerProcess(split4, "--model-name", "tiny4", "--state-dir", state_dir, "--api-key", "s3cret", *LIMITS)
    yield s
    assert s.stop() == 0, s.stderr  # a clean exit, and runtime_only found no compiler module imported


def test_api_key_is_required_when_given(keyed):
    assert "NO AUTHENTICATION" not in keyed.stderr and "Authorization: Bearer" in keyed.stderr
    status, err = http(keyed.url, "/v1/models")
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    status, _ = http(keyed.url, "/v1/completions", OK_COMPLETION, key="wrong")
    assert status == 401
    with pytest.raises(openai.AuthenticationError):
        make_client(keyed.url, api_key="wrong").models.list()
    client = make_client(keyed.url, api_key="s3cret")
    assert [m.id for m in client.models.list()] == ["tiny4"]
    assert client.completions.create(model="tiny4", prompt="x", max_tokens=2).choices[0].text is not None
    with urllib.request.urlopen(keyed.url + "/", timeout=10) as r:  # the page itself loads; it asks for the key
        assert r.status == 200 and b"API key" in r.read()


def test_saved_state_loads_into_another_server_and_continues_the_conversation(srv4, keyed, state_dir):
    client4 = make_client(srv4.url)
    first = [user("Open a file and read it")]
    a1, _, _ = chat_text(client4, "tiny4", first, stream=False, max_tokens=40, **GREEDY)
    conv = [*first, {"role": "assistant", "content": a1}]
    status, saved = http(srv4.url, "/v1/state/save", {"name": "conv", "messages": conv})
    history = f"User: {first[0]['content']}\n\nAssistant: {a1.strip()}\n\n"
    assert status == 200 and saved["tokens"] == len(history.encode()) and saved["cached_tokens"] == saved["tokens"]
    assert (state_dir / "conv.npz").is_file() and not list(state_dir.glob(".conv*"))  # renamed into place
    status, loaded = http(keyed.url, "/v1/state/load", {"name": "conv"}, key="s3cret")
    assert status == 200 and loaded["tokens"] == saved["tokens"]
    keyed_client = make_client(keyed.url, api_key="s3cret")
    _, _, usage = chat_text(keyed_client, "tiny4", [*conv, user("Close it")], stream=False, max_tokens=8, **GREEDY)
    assert usage.prompt_tokens_details.cached_tokens == saved["tokens"]
    assert usage.prompt_tokens - saved["tokens"] == len(b"User: Close it\n\nAssistant:")


def test_a_state_save_killed_mid_write_leaves_the_previous_file_intact(split4, tmp_path):
    """The save is killed after writing its temporary file, before the rename (fsync made slow): the previous
    file is untouched and still loads with its own tokens."""
    path = tmp_path / "conv.npz"
    code = f"""
import os, sys, time
import numpy as np
from rwkv2rknn.run.source import open_program
from rwkv2rknn.serve.statefile import write_saved
program, _ = open_program({str(split4)!r})
state = [np.full(s.shape, float(sys.argv[1]), s.dtype) for s in program.states]
tokens = [int(sys.argv[1])] * 5
if sys.argv[2] == "slow":
    real = os.fsync
    def slow(fd):
        print("writing", flush=True)
        time.sleep(60)
        real(fd)
    os.fsync = slow
write_saved(__import__("pathlib").Path({str(path)!r}), program, state, tokens, np.zeros(256, np.float32), "x", "m")
print("saved", flush=True)
"""
    first = subprocess.run([sys.executable, "-c", code, "1", "fast"], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "saved" in first.stdout, first.stderr
    before = path.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", code, "2", "slow"], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    temps = list(tmp_path.glob(".conv.npz.*.tmp"))
    assert temps and temps[0].stat().st_size > 0  # the new state is written, not yet renamed
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert path.read_bytes() == before
    from rwkv2rknn.run.source import open_program
    from rwkv2rknn.serve.statefile import read_saved

    program, _ = open_program(split4)
    saved = read_saved(path, program)
    assert saved["tokens"] == [1] * 5 and all(np.all(a == 1) for a in saved["state"])


# -- --state: state-tuning files ----------------------------------------------------------------------------------

def _tuning_file(path: Path, layers: int, heads: int, size: int, seed: int = 0) -> dict:
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(seed)
    sd = {f"blocks.{i}.att.time_state": torch.randn(heads, size, size, generator=g) * 2.0 for i in range(layers)}
    torch.save(sd, path)
    return {k: v.numpy() for k, v in sd.items()}


def test_state_tuning_file_is_the_initial_state(split7, srv7, tmp_path):
    tuned = _tuning_file(tmp_path / "tuned.pth", 4, 2, 64)
    with ServerProcess(split7, "--model-name", "tuned", "--state", tmp_path / "tuned.pth",
                       "--state-dir", tmp_path) as s:
        status, body = http(s.url, "/v1/state/save", {"name": "init", "prompt": ""})
        assert status == 200 and body["tokens"] == 0
        with np.load(tmp_path / "init.npz") as z:
            header = json.loads(str(z["header"]))
            for i, st in enumerate(header["states"]):
                got = z[f"state_{i}"]
                if st["name"].endswith("wkv_in"):  # the file's [H, key, value] as the model's [H, value, key]
                    layer = int(st["name"].split("mixing_")[1].split("/")[0])
                    np.testing.assert_array_equal(got, tuned[f"blocks.{layer}.att.time_state"].transpose(0, 2, 1))
                else:
                    assert not got.any()  # token shifts start at zero
        # the state changes what the model says (most right after it: a one-token prompt)
        tuned_reply = make_client(s.url).completions.create(model="tuned", prompt="W", max_tokens=24, **GREEDY)
    plain_reply = make_client(srv7.url).completions.create(model="tiny7", prompt="W", max_tokens=24, **GREEDY)
    assert tuned_reply.choices[0].text != plain_reply.choices[0].text


@pytest.mark.parametrize("which", ["wrong shapes", "RWKV-4 model"])
def test_state_file_that_does_not_fit_is_refused_in_one_line(split4, split7, tmp_path, which):
    f = tmp_path / "tuned.pth"
    if which == "wrong shapes":
        _tuning_file(f, 4, 4, 32)
        out, needle = split7, "shape [4, 32, 32]"
    else:
        _tuning_file(f, 4, 2, 64)
        out, needle = split4, "no state tuning"
    r = subprocess.run([sys.executable, str(RUNTIME_ONLY), "rwkv2rknn.serve", str(out), "--port", "0", "--backend",
                        "ort", "--state", str(f)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(f) in lines[0] and needle in lines[0], r.stderr


# -- the chat page ------------------------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_chat_page_streams_a_reply_in_headless_chromium(srv4, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is not installed (make setup installs Debian's chromium)")
    question = "Write a loop"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 600})
            page.goto(srv4.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny4'", timeout=15000)
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "60")
            page.fill("#input", question)
            page.click("#send")
            page.wait_for_function("document.getElementById('status').dataset.state === 'done'", timeout=30000)
            reply = page.inner_text(".msg.assistant")
            chunks = int(page.get_attribute(".msg.assistant", "data-chunks"))
            page.fill("#input", "Again")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2 && "
                                   "document.getElementById('status').dataset.state === 'done'", timeout=30000)
            status = page.inner_text("#status")
            shot = tmp_path / "chat.png"
            page.screenshot(path=str(shot))
            users = page.locator(".msg.user").all_inner_texts()
        finally:
            browser.close()
    assert users == [question, "Again"]
    assert chunks > 1  # the reply arrived in pieces: streamed
    # the page's reply is the API's greedy reply for the same request (its defaults: top_p 0.3, ChatRWKV penalties)
    api = chat_text(make_client(srv4.url), "tiny4", [user(question)], stream=False, max_tokens=60, temperature=0,
                    top_p=0.3)[0]
    assert reply == api and reply
    cached = len(f"User: {question}\n\nAssistant: {reply.strip()}\n\n".encode())
    computed = len(b"User: Again\n\nAssistant:")
    assert f"{cached} cached, {computed} computed" in status, status
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000


# -- the pieces, in process ---------------------------------------------------------------------------------------

def test_stop_matcher_holds_back_a_partial_stop_across_pieces():
    from rwkv2rknn.serve.sampling import StopMatcher

    m = StopMatcher(["\n\n", "END"])
    sent = []
    for piece in ["ab", "c\n", "x", "E", "N", "d\n", "\n", "tail"]:
        text, stopped = m.add(piece)
        sent.append(text)
        if stopped:
            break
    assert "".join(sent) == "abc\nxENd" and stopped
    assert sent[1] == "c" and sent[2] == "\nx" and sent[3] == "" and sent[4] == ""  # "\n" and "EN" were held back
    m = StopMatcher(["END"])
    assert m.add("the EN") == ("the ", False) and m.flush() == "EN"  # at the end, what was held back goes out


def test_sampler_penalties_top_p_top_k_and_seed():
    from rwkv2rknn.serve.sampling import GenParams, Sampler

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))  # token 0 leads token 1 by log(5/3) = 0.51
    greedy = Sampler(GenParams(temperature=0, presence_penalty=0.3, frequency_penalty=0.2, penalty_decay=0.5), 4)
    assert greedy.sample(logits) == 0
    greedy.update(0)  # occurrence 1: penalty 0.3 + 1 * 0.2 = 0.5 < 0.51
    assert greedy.sample(logits) == 0
    greedy.update(0)  # occurrence 1 * 0.5 + 1 = 1.5: penalty 0.3 + 1.5 * 0.2 = 0.6 > 0.51
    assert np.isclose(greedy.occurrence[0], 1.5) and greedy.sample(logits) == 1
    nucleus = Sampler(GenParams(top_p=0.6, presence_penalty=0, frequency_penalty=0, seed=3), 4)
    assert set(nucleus.sample(logits) for _ in range(300)) == {0, 1}  # 0.5 < 0.6 <= 0.8: the top two
    top1 = Sampler(GenParams(top_p=1.0, top_k=1, presence_penalty=0, frequency_penalty=0, seed=3), 4)
    assert {top1.sample(logits) for _ in range(50)} == {0}
    a, b = (Sampler(GenParams(top_p=1.0, seed=7), 4) for _ in range(2))
    assert [a.sample(logits) for _ in range(30)] == [b.sample(logits) for _ in range(30)]  # seeded: reproducible
    hot = Sampler(GenParams(top_p=1.0, temperature=2.0, presence_penalty=0, frequency_penalty=0, seed=1), 4)
    cold = Sampler(GenParams(top_p=1.0, temperature=0.5, presence_penalty=0, frequency_penalty=0, seed=1), 4)
    n_hot = sum(hot.sample(logits) == 3 for _ in range(2000))
    n_cold = sum(cold.sample(logits) == 3 for _ in range(2000))
    assert n_hot > 2 * n_cold  # temperature flattens (probs ** (1 / T), as the rwkv package samples)


def test_state_cache_longest_prefix_and_byte_bound():
    from rwkv2rknn.serve.cache import StateCache

    state = [np.zeros(100, np.float32)]  # 400 bytes + 4 of logits + 8 per token
    cache = StateCache(3 * 460)
    logits = np.zeros(1, np.float32)
    assert cache.put([1, 2, 3], state, logits) and cache.put([1, 2, 3, 4, 5], [s + 5 for s in state], logits)
    assert cache.lookup([1, 2, 3, 4, 5, 6]).tokens == (1, 2, 3, 4, 5)  # the longest cached prefix
    assert cache.lookup([1, 2, 3, 9]).tokens == (1, 2, 3)
    assert cache.lookup([1, 2]) is None and cache.lookup([7, 1, 2, 3]) is None
    cache.lookup([1, 2, 3])  # most recently used: [1, 2, 3]; least: [1, 2, 3, 4, 5]
    cache.put([8], state, logits)
    cache.put([9], state, logits)
    assert cache.bytes <= cache.max_bytes and cache.evictions == 1
    assert cache.lookup([1, 2, 3, 4, 5]).tokens == (1, 2, 3)  # the LRU entry went first
    assert not StateCache(0).put([1], state, logits)  # off


def test_chat_template_is_the_rwkv_world_format():
    from rwkv2rknn.serve.template import render

    msgs = [("system", "Be brief."), ("user", "Hi\r\n\r\nthere  "), ("assistant", " Hello"), ("developer", "x")]
    assert render(msgs[:3]) == "System: Be brief.\n\nUser: Hi\nthere\n\nAssistant: Hello\n\nAssistant:"
    assert render(msgs, generation_prompt=False).endswith("Assistant: Hello\n\nSystem: x\n\n")


def test_torch_free_pth_reader_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from rwkv2rknn.serve.statefile import read_pth

    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, 5, generator=g)
    sd = {"f32": base, "f16": base.half(), "bf16": base.bfloat16(), "view": base.transpose(0, 2)[1:],
          "param": torch.nn.Parameter(base[0].clone()), "i64": torch.arange(6)}
    torch.save(sd, tmp_path / "t.pth")
    got = read_pth(tmp_path / "t.pth")
    for k, v in sd.items():
        want = v.detach().float().numpy() if k == "bf16" else v.detach().numpy()
        assert got[k].shape == want.shape and np.array_equal(got[k], want), k
    torch.save({"x": base, "f": print}, tmp_path / "evil.pth")  # a pickle naming a global beyond tensors
    from rwkv2rknn.serve.statefile import StateFileError

    with pytest.raises(StateFileError, match="print, which"):
        read_pth(tmp_path / "evil.pth")
