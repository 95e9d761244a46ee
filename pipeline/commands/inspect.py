"""`pipeline inspect MODEL.onnx`: what an ONNX file is and whether dropout could be active in it.

Works on any ONNX file, ours or not; imports onnx only (no torch, no onnxruntime).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.commands.options import console


def inspect(
    model: Annotated[Path, typer.Argument(help="The .onnx file.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the facts as JSON on stdout.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Exit with code 9 when the dropout audit fails.")] = False,
) -> None:
    """Inputs, outputs, opset, IR version, size, op histogram, the dropout audit and the oldest onnxruntime that runs it.

    The audit is the graph part of `export`'s: no Dropout that could run in training mode, no random
    op, no BatchNormalization in training mode. A file inside a run folder is also matched against
    the manifest's record (sha256); inside an unpacked device bundle packed with --ort-format, its
    .ort file and ONNX Runtime's NNAPI / CoreML usability report are shown too.
    """
    from pipeline.artifacts import sha256_file
    from pipeline.compat import requirements
    from pipeline.onnxfile import io_signature, load_model, op_histogram, opset
    from pipeline.verify import audit_graph

    proto = load_model(model)
    audit = audit_graph(proto)
    facts = {
        "file": str(model), "bytes": model.stat().st_size, "sha256": sha256_file(model),
        "opset": opset(proto), "ir_version": proto.ir_version,
        "opset_imports": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        **io_signature(proto),
        "nodes": len(proto.graph.node), "op_histogram": op_histogram(proto),
        "metadata": {p.key: p.value for p in proto.metadata_props if not p.key.startswith("onnxsim.")},
        "dropout_audit": audit.to_dict(),
        "runtime_compatibility": requirements(proto),
        "manifest": _manifest_match(model),
    }
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
    else:
        _show(facts)
    if check and not audit.passed:
        raise typer.Exit(9)


def _manifest_match(model: Path) -> dict | None:
    """The manifest record naming this file, if it sits in a run folder: variant and whether the hash matches."""
    manifest_path = model.parent / "manifest.json"
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    from pipeline.artifacts import sha256_file

    records = manifest.get("artifacts", {}) if isinstance(manifest, dict) else {}
    for variant, record in records.items() if isinstance(records, dict) else ():
        if isinstance(record, dict) and record.get("file") == model.name:
            match = {"variant": variant, "sha256_matches": record.get("sha256") == sha256_file(model),
                     "test_accuracy": record.get("test_accuracy")}
            # Recorded by `pipeline pack --ort-format` in a bundle's manifest: shown, not recomputed
            # (inspect imports no onnxruntime).
            match.update({key: record[key] for key in ("ort_format", "mobile_usability") if key in record})
            return match
    return None


def _show(facts: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{facts['file']}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("size", f"{facts['bytes']:,} bytes")
    table.add_row("opset / IR", f"{facts['opset']} / {facts['ir_version']}"
                  + (f"  (other domains: {', '.join(f'{d} {v}' for d, v in facts['opset_imports'].items() if d != 'ai.onnx')})"
                     if len(facts["opset_imports"]) > 1 else ""))
    table.add_row("producer", facts["producer"] or "-")
    for kind in ("inputs", "outputs"):
        for value in facts[kind]:
            table.add_row(kind[:-1], f"{value['name']}: {value['dtype']} {value['shape']}")
    table.add_row("nodes", f"{facts['nodes']}: " + ", ".join(f"{op} {n}" for op, n in facts["op_histogram"].items()))
    for key, value in facts["metadata"].items():
        table.add_row(f"metadata {key}", value if len(value) <= 100 else value[:97] + "...")
    if facts["manifest"]:
        match = facts["manifest"]
        sha = "matches" if match["sha256_matches"] else "[red]DIFFERS[/]"
        table.add_row("manifest", f"variant {match['variant']}, sha256 {sha}")
    compat = facts["runtime_compatibility"]
    table.add_row("runs on", f"onnxruntime >= {compat['onnxruntime_min'] or '(newer than the table)'}: {compat['basis']}; "
                             f"its ops need opset >= {compat['ops_need_opset']}")
    match = facts["manifest"] or {}
    if "ort_format" in match:
        ort_record = match["ort_format"]
        table.add_row("ORT format", f"{ort_record['file']} ({ort_record['bytes']:,} bytes), max abs diff vs .onnx "
                                    f"{ort_record['max_abs_diff_vs_onnx']:.2g}")
    for ep, entry in (match.get("mobile_usability") or {}).get("execution_providers", {}).items():
        fixed = entry.get("if_input_shapes_fixed")
        table.add_row(f"mobile: {ep}", f"{entry['suitability']}: {entry['partitions']} partitions, "
                                       f"{entry['supported_nodes']}/{entry['nodes']} nodes"
                      + (f", unsupported {', '.join(entry['unsupported_ops'])}" if entry["unsupported_ops"] else "")
                      + (f"; with fixed input shapes {fixed['suitability']} ({fixed['supported_nodes']}/{fixed['nodes']} "
                         f"nodes, {fixed['partitions']} partitions)" if fixed else ""))
    audit = facts["dropout_audit"]
    if audit["passed"]:
        inert = f" ({len(audit['inert_dropouts'])} inert Dropout nodes)" if audit["inert_dropouts"] else ""
        table.add_row("dropout audit", f"[green]pass[/]: no active dropout, random op or training BatchNorm{inert}")
    else:
        table.add_row("dropout audit", "[red]FAIL[/]: " + "; ".join(audit["findings"]))
    console.print(table)
