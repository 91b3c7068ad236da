"""The RWKV World tokenizer (pyrwkv-tokenizer) against the reference trie of the `rwkv` package (BlinkDL's
rwkv_tokenizer.py): the same ids, byte-exact decoding, streaming that holds back split characters, and the
runtime's one-line errors (a model whose vocab is too small, the package missing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from run_support import whole_graph_manifest

from rwkv2rknn.run.tokenizers import StreamDecoder, WorldTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# English, Chinese, Japanese, Arabic, Russian, Korean, Hindi, emoji (a ZWJ family, a flag), characters outside
# the vocab as whole characters (rare CJK ideographs, an emoji the trie spells in byte tokens), combining
# marks, code with tabs and CRLF, runs of spaces, control characters.
TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 3.14159 -- isn't it?\n\n"
    "今天是美好的一天，我们去公园散步吧。人工智能正在改变世界。\n"
    "日本語のテキスト：東京は晴れです。ひらがな、カタカナ、漢字を混ぜて書きます。\n"
    "مرحبا بالعالم، هذا نص عربي للاختبار.\n"
    "Привет, мир! 안녕하세요 세계. नमस्ते दुनिया।\n"
    "Emoji: 😀🎉 👩\u200d👩\u200d👧\u200d👦 🇯🇵 🦀 rare: 𠀀𪚥𰻞 combining: e\u0301 n\u0303\n"
    "def f(x):\n\tif x:\n\t\treturn {'a': [1, 2]}  # comment\r\n\treturn None\n"
    "        indented   with    spaces\x00\x07\x7f end"
)


@pytest.fixture(scope="module")
def world():
    return WorldTokenizer()


@pytest.fixture(scope="module")
def reference():
    """The `rwkv` package's pure-Python trie over its own copy of rwkv_vocab_v20230424.txt (the bench extra)."""
    rwkv = pytest.importorskip("rwkv", reason="the rwkv package (pip install rwkv) is the reference")
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(str(Path(rwkv.__file__).with_name("rwkv_vocab_v20230424.txt")))


def _repo_text(limit: int = 20_000) -> str:
    """A slice of this repository's docs and sources: long English and code, a different mix from TEXT."""
    text = ""
    for p in sorted([*ROOT.glob("docs/*.md"), *ROOT.glob("rwkv2rknn/run/*.py")]):
        text += p.read_text("utf-8")
        if len(text) >= limit:
            break
    return text[:limit]


@pytest.mark.parametrize("which", ["multilingual", "repository"])
def test_ids_equal_the_reference_trie(world, reference, which):
    text = TEXT if which == "multilingual" else _repo_text()
    ids = world.encode(text)
    assert ids == reference.encodeBytes(text.encode("utf-8"))  # the whole list, id for id
    assert len(ids) < len(text.encode("utf-8"))  # real tokens, not bytes


def test_every_token_has_the_reference_bytes(world, reference):
    """Each id 1..65529 decodes to the reference's bytes; each text token encodes to itself alone."""
    assert world.vocab_size == max(reference.idx2token) + 1 == 65530
    assert [world.decode_bytes([i]) for i in range(1, 65530)] == [reference.idx2token[i] for i in range(1, 65530)]
    text_tokens = {}
    for i, b in reference.idx2token.items():
        try:
            text_tokens[i] = b.decode("utf-8")
        except UnicodeDecodeError:
            pass
    assert len(text_tokens) > 60_000
    assert [i for i, s in text_tokens.items() if world.encode(s) != [i]] == []


def test_round_trip(world):
    ids = world.encode(TEXT)
    assert world.decode_bytes(ids) == TEXT.encode("utf-8")
    assert world.tok.decode(ids) == TEXT  # the package's own str decode agrees on whole characters
    assert world.encode("") == [] and world.decode_bytes([]) == b""


def test_split_characters_are_exercised(world):
    """TEXT has characters that the vocab spells over several tokens: ids whose bytes are not UTF-8 alone."""
    partial = []
    for i in world.encode(TEXT):
        try:
            world.decode_bytes([i]).decode("utf-8")
        except UnicodeDecodeError:
            partial.append(i)
    assert partial, "no token of TEXT splits a character: the streaming test would not test holding back"
    emoji = world.encode("🦀")
    assert len(emoji) > 1 and world.decode_bytes(emoji) == "🦀".encode()


def test_streaming_decode_one_id_at_a_time(world):
    ids = world.encode(TEXT)
    dec = StreamDecoder(world)
    pieces = [dec.add(i) for i in ids]
    assert "".join(pieces) == TEXT
    assert "" in pieces  # a token ending inside a character was held back, not printed as U+FFFD
    assert "\ufffd" not in "".join(pieces)


def test_end_of_text_and_untrained_ids_decode_to_nothing(world):
    """id 0 ends the text (generation stops there); ids 65530..65535 exist only in a model's padded head."""
    assert world.decode_bytes([0, 65530, 65535]) == b""
    assert world.decode_bytes([0, *world.encode("ok"), 65535]) == b"ok"


def test_world_hint_loads_for_a_65536_vocab(tmp_path):
    tok = load_tokenizer("world", tmp_path, 65536)
    assert isinstance(tok, WorldTokenizer) and tok.vocab_size == 65530


# -- the command line ---------------------------------------------------------------------------------------

def _cli(*args, code: str | None = None):
    cmd = [PY, "-c", code, *map(str, args)] if code else [PY, "-m", "rwkv2rknn.run", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in err[0], err[0]


@pytest.fixture(scope="module")
def small_vocab(tiny_fp32, tmp_path_factory):
    """A whole model of vocab 256 (bytes): smaller than the World vocab."""
    return whole_graph_manifest(tiny_fp32, tmp_path_factory.mktemp("v256"))


def test_world_refused_for_a_smaller_vocab(small_vocab):
    out = small_vocab.parent
    _one_line_error(_cli(out, "--tokenizer", "world"), "65530 tokens", "vocab is 256")
    _one_line_error(_cli(out, "--tokenizer", "world", "--prompt", "hi", "--max-tokens", "1"), "vocab is 256")


# the package made unimportable, as on a board installed without the extra
_WITHOUT_PACKAGE = (
    "import sys, importlib.abc\n"
    "class B(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, n, p=None, t=None):\n"
    "        if n.split('.')[0] == 'pyrwkv_tokenizer':\n"
    "            raise ModuleNotFoundError(f'No module named {n!r}', name=n)\n"
    "sys.meta_path.insert(0, B())\n"
)


def test_without_the_package_one_line(small_vocab):
    """The module imports without the package; --tokenizer world then says what to install, in one line."""
    code = _WITHOUT_PACKAGE + ("import rwkv2rknn.run.tokenizers\n"
                               "assert 'pyrwkv_tokenizer' not in sys.modules\n"
                               "from rwkv2rknn.run.__main__ import main\n"
                               "sys.exit(main(sys.argv[1:]))\n")
    _one_line_error(_cli(small_vocab.parent, "--tokenizer", "world", "--prompt", "hi", code=code),
                    "pip install pyrwkv-tokenizer")
