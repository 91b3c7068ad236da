"""State files: RWKV state-tuning files for --state, and the server's own saved conversation states.

State tuning (RWKV-PEFT's `state` tuning, the files ChatRWKV's API_DEMO_CHAT.py and RWKV-Runner load) trains only
the initial matrix state of every layer and writes one tensor per layer, `blocks.{i}.att.time_state` of shape
[H, N, N] (heads, head size, head size), as a torch .pth (sometimes .safetensors). Loaders transpose it into
their state (`time_state.transpose(1, 2)`); which layer state it initialises and how its axes map onto this
project's graphs is a fact of the model's family, recorded by the split in the manifest's
`model.state_tuning` ({"input": "wkv_in", "axes": [...]}; rwkv2rknn.families.StateTuning). The token-shift
states start at zero. A family without state tuning records null; for it (and for any family) --state also
takes a state this server saved (.npz).

.pth files are read here without torch (the runtime never imports it): the zip archive's pickle is unpickled
with only the torch names a tensor needs mapped to numpy; anything else in the pickle is refused.

Saved states (POST /v1/state/save) are .npz files: every state array of the program, the token ids the state
is after, the logits after the last of them and a JSON header (the model's state names, dtypes and shapes, and
the fingerprint of the initial state they were computed from). They are written atomically: a temporary file in
the same directory, fsync, rename, fsync of the directory: a save killed half way leaves the previous file whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import struct
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from rwkv2rknn.errors import UserError

FORMAT = "rwkv2rknn-state"
VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class StateFileError(UserError):
    """A state file that does not fit this model (or is not a state file): one line naming the file."""


# -- reading tensors without torch --------------------------------------------------------------------------------

_TORCH_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
                 "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
                 "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = _TORCH_DTYPES[name]


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a torch zip checkpoint's data.pkl into numpy arrays; refuses every other global."""

    def __init__(self, f, archive: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(f)
        self.archive, self.prefix, self.path = archive, prefix, path

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, hooks, *rest: data
        if module == "torch" and name in _TORCH_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise StateFileError(f"{self.path}: the pickle asks for {module}.{name}, which a state file of tensors does "
                             "not need; refused (only plain tensor dicts are read)")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid[:5]
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise StateFileError(f"{self.path}: unsupported tensor storage {pid[:2]!r}")
        raw = self.archive.read(f"{self.prefix}data/{key}")
        if storage_type.dtype == "bfloat16":
            return _bf16_to_f32(np.frombuffer(raw, dtype="<u2", count=numel))
        return np.frombuffer(raw, dtype=np.dtype(storage_type.dtype).newbyteorder("<"), count=numel)


def _rebuild_tensor(storage, offset, size, stride, *rest):
    itemsize = storage.dtype.itemsize
    if not size:
        return np.array(storage[offset], copy=True)
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride))
    return np.array(view, copy=True)


def read_pth(path: Path) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise StateFileError(f"{path}: not a torch zip checkpoint (a legacy torch.save file? save it again with a "
                             "current torch)") from None
    with archive:
        pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pkl:
            raise StateFileError(f"{path}: a zip without data.pkl: not a torch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        try:
            obj = _TorchUnpickler(io.BytesIO(archive.read(pkl[0])), archive, prefix, path).load()
        except StateFileError:
            raise
        except Exception as exc:
            raise StateFileError(f"{path}: unreadable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise StateFileError(f"{path}: not a plain dict of tensors")
    return dict(obj)


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": "bfloat16", "I64": np.int64,
              "I32": np.int32}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except Exception:
        raise StateFileError(f"{path}: not a safetensors file") from None
    out = {}
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise StateFileError(f"{path}: tensor {name} has dtype {info.get('dtype')}, not a float state")
        lo, hi = info["data_offsets"]
        raw = data[base + lo: base + hi]
        arr = _bf16_to_f32(np.frombuffer(raw, "<u2")) if dtype == "bfloat16" else np.frombuffer(raw, dtype)
        out[name] = arr.reshape(info["shape"]).copy()
    return out


# -- the model's states, by layer -------------------------------------------------------------------------------

def _layer_of(name: str, suffix: str) -> int | None:
    m = re.search(rf"mixing_(\d+)/{suffix}$", name)
    return int(m.group(1)) if m else None


def state_tuning(tensors: dict[str, np.ndarray], path: Path, program, init: list[np.ndarray]) -> list[np.ndarray]:
    """The initial state a state-tuning file gives this model (init: the program's reset state, in order)."""
    model = program.model or {}
    family = model.get("family")
    tuning = model.get("state_tuning")
    keys = sorted(k for k in tensors if k.endswith(".att.time_state"))
    if not tuning:
        why = "which has no state tuning" if "state_tuning" in model else \
            "whose split predates state-tuning facts in the manifest (split it again)"
        raise StateFileError(f"{path}: a state-tuning file (blocks.N.att.time_state); this model is {family}, {why}; "
                             "--state takes a state this server saved (POST /v1/state/save, .npz)")
    if not keys:
        raise StateFileError(f"{path}: no blocks.N.att.time_state tensors: not a state-tuning file")
    axes = tuple(tuning["axes"])
    wkv = {i: k for k, st in enumerate(program.states) if (i := _layer_of(st.name, tuning["input"])) is not None}
    n_layer = model.get("n_layer") or len(wkv)
    if len(wkv) != n_layer:
        raise StateFileError(f"{path}: this split's states are not one matrix state per layer; load the state into a "
                             "split made by the default policy")
    layers = {}
    for k in keys:
        m = re.fullmatch(r"blocks\.(\d+)\.att\.time_state", k)
        if m is None:
            raise StateFileError(f"{path}: unexpected tensor name {k}")
        layers[int(m.group(1))] = tensors[k]
    if sorted(layers) != list(range(n_layer)):
        raise StateFileError(f"{path}: time_state for {len(layers)} layer(s) (0..{max(layers)}), but the model has "
                             f"{n_layer} layers: tuned for another model")
    out = [np.array(a, copy=True) for a in init]
    for i in range(n_layer):
        idx = wkv[i]
        want = tuple(program.states[idx].shape)
        got = tuple(layers[i].shape)
        if got != want:
            raise StateFileError(f"{path}: blocks.{i}.att.time_state has shape {list(got)} but this model's layer "
                                 f"state is {list(want)} (heads, head size, head size): tuned for another model")
        out[idx] = np.ascontiguousarray(layers[i].transpose(axes)).astype(program.states[idx].dtype)
    return out


def describe_states(program) -> list[dict]:
    return [{"name": s.name, "dtype": str(np.dtype(s.dtype)), "shape": list(s.shape)} for s in program.states]


def fingerprint(state: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in state:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def load_initial(path: str | os.PathLike, program, init: list[np.ndarray]) -> list[np.ndarray]:
    """--state FILE: a state-tuning .pth/.safetensors, or a state this server saved (.npz)."""
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"{path}: no such state file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        saved = read_saved(path, program)
        return saved["state"]
    if suffix == ".safetensors":
        tensors = read_safetensors(path)
    elif suffix in (".pth", ".pt", ".bin"):
        tensors = read_pth(path)
    else:
        raise StateFileError(f"{path}: unknown state file type; give a state-tuning .pth or .safetensors, or a "
                             ".npz saved by this server")
    return state_tuning(tensors, path, program, init)


# -- the server's own state files --------------------------------------------------------------------------------

def write_saved(path: Path, program, state: list[np.ndarray], tokens: list[int], logits: np.ndarray | None,
                init_fingerprint: str, model_name: str) -> int:
    """Write a saved state atomically (temporary file, fsync, rename, fsync the directory); returns its size."""
    header = {"format": FORMAT, "version": VERSION, "model": model_name, "family": (program.model or {}).get("family"),
              "vocab_size": (program.model or {}).get("vocab_size"), "states": describe_states(program),
              "initial_state": init_fingerprint, "tokens": len(tokens)}
    arrays = {f"state_{i}": np.ascontiguousarray(a) for i, a in enumerate(state)}
    arrays["tokens"] = np.asarray(tokens, dtype=np.int64)
    if logits is not None:
        arrays["logits"] = np.asarray(logits, dtype=np.float32)
    arrays["header"] = np.array(json.dumps(header))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):  # the rename itself durable (not every file system allows this)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path.stat().st_size


def read_saved(path: Path, program, init_fingerprint: str | None = None) -> dict:
    """A saved state checked against this model: {state, tokens, logits, header}; StateFileError when it does not fit."""
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            n = len(header["states"])
            state = [z[f"state_{i}"] for i in range(n)]
            tokens = [int(t) for t in z["tokens"]]
            logits = z["logits"] if "logits" in z.files else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise StateFileError(f"{path}: not a state file saved by rwkv2rknn.serve ({type(exc).__name__})") from None
    if header.get("format") != FORMAT or header.get("version", 0) > VERSION:
        raise StateFileError(f"{path}: not a {FORMAT} file of version <= {VERSION}")
    want = describe_states(program)
    if len(want) != len(state):
        raise StateFileError(f"{path}: {len(state)} state arrays, this model has {len(want)}: saved from another "
                             f"model ({header.get('family')}, {header.get('model')})")
    for i, (w, a) in enumerate(zip(want, state)):
        if list(a.shape) != w["shape"]:
            raise StateFileError(f"{path}: state {i} ({w['name']}) has shape {list(a.shape)}, this model's is "
                                 f"{w['shape']}: saved from another model ({header.get('family')}, "
                                 f"{header.get('model')})")
    vocab = (program.model or {}).get("vocab_size")
    if vocab and (any(not 0 <= t < vocab for t in tokens) or (logits is not None and logits.shape != (vocab,))):
        raise StateFileError(f"{path}: its tokens or logits do not fit this model's vocabulary of {vocab}")
    if init_fingerprint is not None and header.get("initial_state") != init_fingerprint:
        raise StateFileError(f"{path}: computed from another initial state (another --state) than this server's")
    state = [a.astype(w["dtype"]) for w, a in zip(want, state)]
    return {"state": state, "tokens": tokens, "logits": logits, "header": header}
