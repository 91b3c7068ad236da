"""The build record (OUT/build.json): what `build` made of each segment, kept beside the plan, keyed by segment id.

`split` writes the plan (OUT/manifest.json) and never sees a build; `build` writes this record and never edits
the plan. Per segment id it holds the .rknn file and its sha256, the precision (and why, where it differs),
the simulator's verification, the compiler's table, the core mask, or why the segment fell back to the CPU;
a segment the compiler could only take in halves holds the halves (`pieces`, each a segment entry of its own).

`join(plan, record)` gives the combined view the cost model, the report and the build itself read (the shape
of a format-2 manifest, whose segments held these keys inline); `split_legacy` takes a format-2 manifest
apart. `source_hashes(root)` stamps a program with the plan and record it was lowered from. Standard library
only: the runtime lowers an old output with it, and checks a program's stamp.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

BUILD_NAME = "build.json"
PLAN_NAME = "manifest.json"  # the plan (rwkv2rknn/manifest.py MANIFEST_NAME)
RECORD_VERSION = 1
# Per-segment keys a build writes; a rebuild clears them first so no entry names a file being replaced.
SEGMENT_KEYS = ("rknn", "rknn_sha256", "toolkit", "precision", "precision_reason", "verify", "build_key",
                "fallback_reason", "calib", "calib_sha256", "compiler", "hybrid")
# Keys a build may set on a segment that the plan also carries (the build refines the plan's guess).
REFINED_KEYS = ("core_mask",)


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def source_hashes(root: Path) -> dict:
    """sha256 of the plan and build record a program is lowered from (what makes a program stale)."""
    return {"manifest_sha256": _sha256(root / PLAN_NAME), "build_sha256": _sha256(root / BUILD_NAME)}


def plan_graphs(data: dict) -> list[dict]:
    """The decode plan's graphs, then the prefill plan's, then the verify plan's."""
    return (data["graphs"] + ((data.get("prefill") or {}).get("graphs") or [])
            + ((data.get("verify") or {}).get("graphs") or []))


def empty_record() -> dict:
    return {"format_version": RECORD_VERSION, "segments": {}}


def load_record(root: str | Path) -> dict | None:
    """OUT/build.json, or None before any build (a malformed file is a ValueError naming it)."""
    path = Path(root) / BUILD_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable build record ({exc}); run `rwkv2rknn build` again") from None
    if not isinstance(data, dict) or not isinstance(data.get("segments"), dict):
        raise ValueError(f"{path}: not an rwkv2rknn build record; run `rwkv2rknn build` again")
    if data.get("format_version", 0) > RECORD_VERSION:
        raise ValueError(f"{path}: build record format {data['format_version']} is newer than this rwkv2rknn "
                         f"understands ({RECORD_VERSION}); upgrade rwkv2rknn")
    return data


def join(plan: dict, record: dict | None) -> dict:
    """The plan with the record's results in its segments (format-2 shape; the plan itself is not changed)."""
    data = copy.deepcopy(plan)
    if not record:
        return data
    recs = record.get("segments") or {}
    for g in plan_graphs(data):
        segs = []
        moved: dict[str, tuple[str, str]] = {}
        for seg in g["segments"]:
            rec = recs.get(seg["id"]) or {}
            if rec.get("pieces"):
                pieces = copy.deepcopy(rec["pieces"])
                segs.extend(pieces)
                for p in pieces:
                    for node in p.get("node_names", []):
                        moved[node] = (p["id"], "npu" if not p.get("fallback_reason") else "cpu")
                continue
            merged = {**seg, **{k: v for k, v in rec.items() if k in SEGMENT_KEYS or k in REFINED_KEYS}}
            if merged.get("fallback_reason"):
                merged["backend"] = "cpu"
            segs.append(merged)
        g["segments"] = segs
        fallen = {s["id"]: s["fallback_reason"] for s in segs if s.get("fallback_reason")}
        for row in g.get("placement", []):
            if row.get("node") in moved:
                row["segment"] = moved[row["node"]][0]
            if row.get("segment") in fallen:
                row["backend"] = "cpu"
                row["reason"] = f"fell back: {fallen[row['segment']]}"
    build = {k: v for k, v in record.items() if k not in ("segments", "format_version", "manifest_sha256")}
    if build:
        data["build"] = build
    return data


def record_of(joined: dict, plan: dict) -> dict:
    """The build record of a combined view (what `join(plan, record)` would give back)."""
    record = empty_record()
    record.update({k: v for k, v in (joined.get("build") or {}).items()})
    by_id = {s["id"]: s for g in plan_graphs(joined) for s in g["segments"]}
    pieces_of: dict[str, list] = {}
    for s in by_id.values():
        if s.get("bisected_from") and s["bisected_from"] != s["id"]:
            pieces_of.setdefault(s["bisected_from"], []).append(s)
    for g in plan_graphs(plan):
        for seg in g["segments"]:
            sid = seg["id"]
            if sid in by_id:
                s = by_id[sid]
                rec = {k: s[k] for k in SEGMENT_KEYS if k in s}
                rec.update({k: s[k] for k in REFINED_KEYS if k in s and s[k] != seg.get(k)})
                if rec:
                    record["segments"][sid] = rec
            elif sid in pieces_of:
                record["segments"][sid] = {"pieces": copy.deepcopy(pieces_of[sid])}
    return record


def split_legacy(data: dict) -> tuple[dict, dict | None]:
    """A format-2 manifest (build results inline) as (plan, record)."""
    plan = copy.deepcopy(data)
    plan.pop("build", None)
    has_build = "build" in data
    for g in plan_graphs(plan):
        kept = []
        for seg in g["segments"]:  # halves a format-2 build bisected stay segments of the plan
            base = {k: v for k, v in seg.items() if k not in SEGMENT_KEYS}
            if seg.get("fallback_reason"):
                base["backend"] = "npu"
            has_build = has_build or any(k in seg for k in SEGMENT_KEYS)
            kept.append(base)
        g["segments"] = kept
    plan["format_version"] = 3
    return plan, (record_of(data, plan) if has_build else None)


__all__ = ["BUILD_NAME", "RECORD_VERSION", "REFINED_KEYS", "SEGMENT_KEYS", "empty_record", "join", "load_record",
           "plan_graphs", "record_of", "split_legacy"]
