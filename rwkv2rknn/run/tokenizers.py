"""Tokenizers for the runtime: bytes (V=256), the RWKV World trie vocab, or a tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from rwkv2rknn.errors import UserError


class BytesTokenizer:
    """One token per byte: the tokenizer of tiny test models (vocab 256)."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids: list[int]) -> bytes:
        return bytes(i & 0xFF for i in ids)


class WorldTokenizer:
    """The RWKV World vocabulary through the `rwkv` package's pure-Python trie (no torch import)."""

    name = "world"

    def __init__(self):
        try:
            import rwkv
            from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
        except ImportError:
            raise UserError("--tokenizer world needs the `rwkv` package (pip install rwkv), which ships "
                            "rwkv_vocab_v20230424.txt") from None
        vocab = Path(rwkv.__file__).with_name("rwkv_vocab_v20230424.txt")
        if not vocab.exists():
            raise UserError(f"{vocab}: missing from the installed `rwkv` package; reinstall it")
        self.trie = TRIE_TOKENIZER(str(vocab))
        self.vocab_size = max(self.trie.idx2token) + 1

    def encode(self, text: str) -> list[int]:
        return self.trie.encodeBytes(text.encode("utf-8"))

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.trie.decodeBytes(ids)


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
