"""The token loop of a whole model in the manifest: hand-offs between graphs, recurrent states, token, logits."""

from __future__ import annotations

from rwkv2rknn import policies
from rwkv2rknn.deep import Unit, tensor_ref
from rwkv2rknn.model import RwkvModel


def _tokenizer_hint(model: RwkvModel) -> str | None:
    if model.tokenizer_file is not None:
        return "tokenizer.json"
    if model.vocab_size == 256:
        return "bytes"
    if model.vocab_size == 65536:
        return "world"
    if 50254 <= model.vocab_size <= 50432:  # GPT-NeoX 20B BPE (Pile / Raven)
        return "neox"
    return None


def hand_offs(model: RwkvModel, unit_of: dict[str, Unit], last_into_head: bool = False) -> list[dict]:
    """The model's links between graphs as manifest links between the split's units; a link inside a merged unit
    is a tensor of that unit's graph, not a hand-off. last_into_head (a prefill plan): the head reads only the
    last row of what it is given (logits for the chunk's last token)."""
    out = []
    for a, o, b, i in model.family.links(model.n_layer):
        if unit_of[a] is unit_of[b]:
            continue
        link = {"from": tensor_ref(unit_of[a], a, o), "to": tensor_ref(unit_of[b], b, i)}
        if last_into_head and b == "head":
            link["last"] = True
        out.append(link)
    return out


FP16_SUFFIX = "@fp16"  # passes.boundary's name for the fp16 copy of an fp32 buffer an NPU segment reads


def fp16_links(links: list[dict], entries: list[dict]) -> list[dict]:
    """Links plus one per graph input `<name>@fp16` (an NPU segment reading the fp16 copy of what the link carries):
    the same source; the program converts it once where the link's writer gives fp32."""
    inputs = {(e["name"], t["name"]) for e in entries for t in e["inputs"]}
    out = list(links)
    for link in links:
        to = link["to"]
        if (to["graph"], to["name"] + FP16_SUFFIX) in inputs:
            out.append({**link, "to": {"graph": to["graph"], "name": to["name"] + FP16_SUFFIX}})
    return out


def state_shadow(entries: list[dict], graph: str, state_input: str) -> dict | None:
    """{input, output, dtype}: the fp16 copy of an fp32 state that an NPU segment reads, written by its update."""
    for e in entries:
        if e["name"] == graph and state_input in (e.get("state_shadows") or {}):
            return {**e["state_shadows"][state_input], "dtype": "float16"}
    return None


def input_dtypes(entries: list[dict]) -> dict[str, str]:
    """Graph input name -> dtype over a plan's graph entries (a state kept fp16 by the NPU is float16)."""
    return {t["name"]: t["dtype"] for e in entries for t in e["inputs"]}


def model_loop(model: RwkvModel, units: list[Unit], entries: list[dict], npu_all: bool) -> dict:
    """The manifest's `model`: links between graphs, recurrent states with their initial values, token input,
    logits, vocab and tokenizer hint, in terms of the split's units (a merged unit holds `<graph>.<name>`)."""
    unit_of = {src.name: u for u in units for src in u.sources}
    graph_policy = {e["name"]: e["policy"] for e in entries}
    # a state the NPU keeps in fp16 between calls (deep, --state-update npu) is carried as float16
    state_dtype = input_dtypes(entries)

    def ref(graph: str, tensor: str) -> dict:
        return tensor_ref(unit_of[graph], graph, tensor)

    links = fp16_links(hand_offs(model, unit_of), entries)

    # A family's fp32-only initial rows (RWKV-4's pp = -1e30 overflows float16) apply only while the state
    # stays fp32 on the CPU; at 0 instead the outputs are the same because aa = bb = 0 at the start.
    def init_rows(graph: str, spec, dtype: str) -> dict:
        unit = unit_of[graph].name
        fp32_recurrence = (model.float_dtype == "float32" and dtype == "float32"
                           and not (policies.get(graph_policy[unit]).npu_all or npu_all))
        return {str(r): v for r, v in spec.rows_fp32.items()} if fp32_recurrence else {}

    state = []
    for i in range(model.n_layer):
        g = f"mixing_{i}"
        for spec in model.family.states:
            r_in, r_out = ref(g, spec.input), ref(g, spec.output)
            dtype = state_dtype.get(r_in["name"], "float32")
            st = {"graph": r_in["graph"], "input": r_in["name"], "output": r_out["name"],
                  "shape": list(model.state_shapes[spec.input]), "dtype": dtype,
                  "init": {"fill": 0.0, "rows": init_rows(g, spec, dtype)}}
            shadow = state_shadow(entries, r_in["graph"], r_in["name"])
            if shadow is not None:
                st["shadow"] = shadow
            state.append(st)
    tuning = model.family.state_tuning
    return {"family": model.family.name, "n_layer": model.n_layer, "n_embd": model.n_embd,
            "state_tuning": tuning.record() if tuning is not None else None,
            "vocab_size": model.vocab_size,
            "tokenizer": _tokenizer_hint(model),
            "token_input": ref("embed", "token"),
            "logits": ref("head", "output"),
            "links": links, "state": state}
