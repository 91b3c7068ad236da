"""Tokenizers for the runtime: bytes (V=256), the RWKV World vocab (pyrwkv-tokenizer), or a tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from rwkv2rknn.errors import UserError

# Control characters of generated text shown as U+FFFD on a terminal (tab and newline kept): str.translate table.
CONTROLS = {c: "\ufffd" for c in [*range(0x20), *range(0x7F, 0xA0)] if c not in (0x09, 0x0A)}


class BytesTokenizer:
    """One token per byte: the tokenizer of tiny test models (vocab 256)."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids: list[int]) -> bytes:
        return bytes(i & 0xFF for i in ids)


class WorldTokenizer:
    """The RWKV World vocabulary (65,530 ids, RWKV-5/6/7 World) through `pyrwkv-tokenizer`, a Rust trie.

    Its encode gives the ids of the reference trie (BlinkDL's rwkv_tokenizer.py); its decode returns str and
    panics on a token that ends inside a UTF-8 sequence, so decode_bytes reads each id's bytes from a table:
    the package's get_vocab() for the text tokens and its vocab file's b'..' lines for the ~480 byte tokens."""

    name = "world"
    _NOT_TEXT = "Binary string (TODO)"  # get_vocab()'s key for every token that is not UTF-8

    def __init__(self):
        try:
            import pyrwkv_tokenizer
        except ImportError:
            raise UserError("--tokenizer world needs the `pyrwkv-tokenizer` package: pip install pyrwkv-tokenizer "
                            "(or pip install 'rwkv2rknn[board]')") from None
        self.tok = pyrwkv_tokenizer.RWKVTokenizer()
        self.vocab_size = self.tok.vocab_size()  # 65530: ids 1..65529, and 0 (end of text)
        self._bytes: list[bytes] | None = None

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text))

    def _table(self) -> list[bytes]:
        import ast
        import re

        table: list[bytes | None] = [None] * self.vocab_size
        for text, i in self.tok.get_vocab().items():
            if text != self._NOT_TEXT:
                table[i] = text if isinstance(text, bytes) else text.encode("utf-8")
        table[0] = b""  # end of text (the package keeps a NUL there; the reference has no id 0)
        with open(self.tok.vocab_filepath, encoding="utf-8") as f:
            for m in re.finditer(r"^(\d+) (b['\"].*) \d+$", f.read(), re.M):  # the byte tokens: b'\xe4\xb8'
                table[int(m[1])] = ast.literal_eval(m[2])
        missing = [i for i, b in enumerate(table) if b is None]
        if missing:
            raise UserError(f"{self.tok.vocab_filepath}: no bytes for token id {missing[0]}; reinstall pyrwkv-tokenizer")
        return table

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The bytes of ids (possibly a partial UTF-8 sequence); ids past the vocab (65530..65535 of a model's
        padded head, never trained) are empty."""
        if self._bytes is None:
            self._bytes = self._table()
        table, n = self._bytes, self.vocab_size
        return b"".join(table[i] if 0 <= i < n else b"" for i in ids)


class JsonTokenizer:
    """A Hugging Face tokenizer.json (the GPT-NeoX 20B BPE of RWKV-4 Pile/Raven)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise UserError(f"{path}: not a readable tokenizer.json ({str(exc).splitlines()[0][:200]}); "
                            "pass another --tokenizer") from None
        self.name = str(path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def load_tokenizer(spec: str | None, manifest_root: Path, model_vocab: int):
    """spec: a tokenizer.json path, "world", "bytes", "neox", or None (the manifest's hint)."""
    if spec is None:
        raise UserError(f"{manifest_root}/manifest.json names no tokenizer; pass --tokenizer PATH|world|bytes, "
                        "or feed ids with --tokens")
    if spec == "bytes":
        tok = BytesTokenizer()
    elif spec == "world":
        tok = WorldTokenizer()
    else:
        path = Path(spec)
        if spec == "neox":
            path = manifest_root / "tokenizer.json"
            if not path.exists():
                raise UserError(f"{manifest_root}: the model uses the GPT-NeoX tokenizer but no tokenizer.json lies "
                                "beside the manifest; pass --tokenizer PATH/20B_tokenizer.json")
        elif not path.is_absolute() and not path.exists():
            path = manifest_root / spec
        if not path.exists():
            raise UserError(f"{spec}: no such tokenizer file; pass --tokenizer PATH|world|bytes")
        tok = JsonTokenizer(path)
    if tok.vocab_size > model_vocab:
        raise UserError(f"tokenizer {tok.name} has {tok.vocab_size} tokens but the model's vocab is {model_vocab}; "
                        "pass the tokenizer the model was trained with (--tokenizer)")
    return tok


class StreamDecoder:
    """Incremental detokenizer: the text of each new id, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        import codecs

        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned (tokenizer.json path)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        if hasattr(self.tok, "decode_bytes"):
            return self.utf8.decode(self.tok.decode_bytes([token]))
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next id
            return ""
        new = text[self.emitted:]
        self.emitted = len(text)
        return new
