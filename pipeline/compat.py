"""Which ONNX Runtime releases can run an ONNX file: derived from the opsets, IR version and ops it uses.

Imports onnx only (no torch, no onnxruntime), so `inspect` can show it for any file.

The rule (ONNX Runtime's compatibility page): a release that implements opset N of a domain runs
models stamped with opsets 7..N of it, and refuses a model whose IR version is newer than the one
it supports. So the oldest release that runs a file is the oldest one whose row covers
- the file's IR version, and
- the stamped opset of every domain the graph really uses (a domain imported but used by no node,
  such as the `ai.onnx.ml` import onnxruntime's quantizer adds, constrains nothing).
The ops themselves are recorded with the opset each one's definition dates from
(`ops_need_opset`): that is the lowest opset the same graph could be stamped with, i.e. how far
`pipeline export --opset` could lower it (with a matching IR version) for an older runtime.
"""

from __future__ import annotations

import onnx

# The device runner must carry its own copy of the version comparison (it imports nothing from
# `pipeline` once bundled): this module uses that one rather than a second.
from pipeline.device_runner import version_tuple

# ONNX Runtime release -> (ai.onnx opset, ai.onnx.ml opset, IR version) it implements.
# Source: ONNX Runtime's compatibility table, docs/reference/compatibility.md
# (https://onnxruntime.ai/docs/reference/compatibility.html, "ONNX opset support"), read 2026-12-02;
# the table ends at 1.20. A file beyond it is reported as needing a release newer than 1.20.
ORT_RELEASES: tuple[tuple[str, int, int, int], ...] = (
    ("1.0", 11, 2, 6), ("1.1", 11, 2, 6), ("1.2", 11, 2, 6), ("1.3", 12, 2, 7), ("1.4", 12, 2, 7),
    ("1.5", 12, 2, 7), ("1.6", 13, 2, 7), ("1.7", 13, 2, 7), ("1.8", 14, 2, 7), ("1.9", 15, 2, 8),
    ("1.10", 15, 2, 8), ("1.11", 16, 2, 8), ("1.12", 17, 3, 8), ("1.13", 17, 3, 8), ("1.14", 18, 3, 8),
    ("1.15", 19, 3, 8), ("1.16", 19, 3, 9), ("1.17", 20, 4, 9), ("1.18", 21, 4, 10), ("1.19", 21, 4, 10),
    ("1.20", 21, 4, 10),
)
TABLE_SOURCE = "https://onnxruntime.ai/docs/reference/compatibility.html"
# Domains whose versions the table tracks; contrib domains (com.microsoft) have been at version 1
# in every release the table lists, so they add no constraint.
_TABLE_COLUMNS = {"ai.onnx": 1, "ai.onnx.ml": 2}


def _domain(name: str) -> str:
    return name or "ai.onnx"


def _used_domains(graph: onnx.GraphProto, found: set[str]) -> set[str]:
    for node in graph.node:
        found.add(_domain(node.domain))
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _used_domains(sub, found)
    return found


def ops_since(model: onnx.ModelProto) -> dict[str, int]:
    """'Conv' (or 'domain::Op') -> the opset its definition at the stamped opset dates from."""
    stamped = {_domain(o.domain): o.version for o in model.opset_import}
    result: dict[str, int] = {}
    for node in model.graph.node:
        domain = _domain(node.domain)
        key = node.op_type if domain == "ai.onnx" else f"{domain}::{node.op_type}"
        try:
            schema = onnx.defs.get_schema(node.op_type, stamped.get(domain, 1), "" if domain == "ai.onnx" else domain)
            result[key] = schema.since_version
        except onnx.defs.SchemaError:  # a contrib op onnx does not define (com.microsoft): its stamped version
            result[key] = stamped.get(domain, 1)
    return dict(sorted(result.items()))


def requirements(model: onnx.ModelProto) -> dict:
    """The file's opset imports, IR version, ops, and the oldest ONNX Runtime release that runs it (with why)."""
    stamped = {_domain(o.domain): o.version for o in model.opset_import}
    used = _used_domains(model.graph, set())
    since = ops_since(model)
    needs: list[tuple[str, str]] = []  # (oldest release, reason)

    def oldest(column: int, value: int, what: str) -> None:
        for release, *row in ORT_RELEASES:
            if row[column - 1] >= value:
                needs.append((release, what))
                return
        needs.append((None, what))

    oldest(3, model.ir_version, f"IR version {model.ir_version}")
    for domain, column in _TABLE_COLUMNS.items():
        if domain in used and domain in stamped:
            oldest(column, stamped[domain], f"{domain} opset {stamped[domain]}")
    beyond = [what for release, what in needs if release is None]
    if beyond:
        minimum, basis = None, f"{', '.join(beyond)} is newer than the last release in the table ({ORT_RELEASES[-1][0]})"
    else:
        minimum, what = max(needs, key=lambda item: version_tuple(item[0]))
        others = [f"{w}: >= {r}" for r, w in needs if w != what]
        basis = f"{what} needs onnxruntime >= {minimum}" + (f" ({'; '.join(others)})" if others else "")
    ai_onnx_ops = [v for k, v in since.items() if "::" not in k]
    return {
        "opset_imports": dict(sorted(stamped.items())),
        "domains_used": sorted(used),
        "ir_version": model.ir_version,
        "ops_need_opset": max(ai_onnx_ops) if ai_onnx_ops else None,
        "ops": since,
        "onnxruntime_min": minimum,
        "basis": basis,
        "table": TABLE_SOURCE,
    }


def strictest(records: list[dict]) -> str | None:
    """The newest `onnxruntime_min` of several artifacts' requirements (None if any is beyond the table)."""
    versions = [r.get("onnxruntime_min") for r in records]
    if not versions or any(v is None for v in versions):
        return None
    return max(versions, key=version_tuple)
