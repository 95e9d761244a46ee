"""The README's study tables, generated from a study.json (no number in them is typed by hand).

    python tools/study_table.py studies/mnist-test/study.json                 # print the markdown
    python tools/study_table.py studies/mnist-test/study.json --readme README.md   # replace the marked block

The README block lies between `<!-- study-table:start -->` and `<!-- study-table:end -->`.
A `study.partial.json` (a study stopped after some sizes) is accepted and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

START, END = "<!-- study-table:start -->", "<!-- study-table:end -->"


def ci(stat: dict, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return (f"{scale * stat['value']:{sign}.{digits}f} [{scale * stat['low']:{sign}.{digits}f}, "
            f"{scale * stat['high']:{sign}.{digits}f}]")


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return [_row(header), _row(align), *(_row(r) for r in rows)]


def _fmt(value: float) -> str:
    return f"{value:g}"


def size_tables(report: dict) -> list[str]:
    seeds = len(report["config"]["seeds"])
    test = report["dataset"]["sizes"]["test"]
    lines = []
    for block in report["by_size"]:
        lines += [f"**{block['train_size']} training images** (epoch budget {block['epochs']}, {seeds} seeds, "
                  f"{test} test images; 95% bootstrap intervals over seeds and test images; "
                  "\"vs none\" is the paired difference):", ""]
        rows = []
        none_seconds = block["variants"]["none"]["seconds_per_epoch"]
        for name, row in block["variants"].items():
            versus = row.get("vs_none")
            rows.append([name, row["label"], ci(row["test_accuracy"]), ci(versus, signed=True) if versus else "—",
                         versus["verdict"] if versus else "—", f"{100 * row['accuracy_gap']:.1f}",
                         f"{row['best_epoch']:.1f} / {row['epochs_run']:.1f}",
                         f"{row['best_at_last_epoch']}/{len(row['runs'])}",
                         f"{row['seconds_per_epoch']:.2f} ({row['seconds_per_epoch'] / none_seconds:.2f})"])
        same = [n for n in block["variants"] if n != "dropout_article" and block["chosen"][n] == block["chosen"].get("dropout_article")]
        if same:
            lines += [f"(`dropout_article` has the setting chosen for `{same[0]}`: the same runs, one row each.)", ""]
        lines += _table(["variant", "setting (chosen on validation)", "test acc %", "vs none, pts", "verdict",
                         "train − test acc, pts", "best epoch / epochs run", "best = last epoch",
                         "s/epoch (× none)"], rows, right_from=2)
        lines += ["", "Tuning (first seed, validation loss of the early-stopping checkpoint; the chosen value in bold):", ""]
        by_variant: dict[str, list[str]] = {}
        for record in block["tuning"]:
            setting = record["setting"]
            value = {"dropout": setting["dropout"] if not setting["weight_decay"] else setting["weight_decay"],
                     "spatial_dropout": setting["spatial_dropout"], "l2": setting["weight_decay"],
                     "l1": setting["l1"], "dropout_l2": setting["weight_decay"]}[record["variant"]]
            text = f"{_fmt(value)}: {record['score']:.4f}"
            by_variant.setdefault(record["variant"], []).append(f"**{text}**" if record["chosen"] else text)
        for variant, texts in by_variant.items():
            lines.append(f"- {variant}: " + ", ".join(texts))
        lines.append("")
    return lines


def mc_tables(report: dict) -> list[str]:
    lines = []
    for block in report["by_size"]:
        mc = block.get("mc")
        if not mc:
            continue
        temps = ", ".join(f"{t:.2f}" for t in mc["temperatures"])
        lines += [f"**MC dropout, {block['train_size']} training images** ({mc['label']}; temperature fitted on "
                  f"validation per seed: {temps}):", ""]
        rows = []
        for method, row in mc["methods"].items():
            det, temp = row.get("vs_deterministic"), row.get("vs_temperature")
            rows.append([method, ci(row["accuracy"], digits=2), ci(row["nll"], 1.0, 3), ci(row["ece"], digits=2),
                         f"{ci(det['nll'], 1.0, 3, True)} {det['nll']['verdict']}" if det else "—",
                         f"{ci(det['ece'], digits=2, signed=True)} {det['ece']['verdict']}" if det else "—",
                         f"{ci(temp['nll'], 1.0, 3, True)} {temp['nll']['verdict']}" if temp else "—",
                         f"{ci(temp['ece'], digits=2, signed=True)} {temp['ece']['verdict']}" if temp else "—"])
        lines += _table(["method", "accuracy %", "NLL", "ECE %", "NLL vs deterministic", "ECE vs deterministic",
                         "NLL vs temperature", "ECE vs temperature"], rows)
        lines.append("")
    return lines


def latency_tables(report: dict) -> list[str]:
    lines = []
    if report.get("inference"):
        rows = []
        for name, record in report["inference"].items():
            ms = record["latency"]["latency_ms"]
            ratio = record["p50_vs_none"]
            rows.append([name, f"{1000 * ms['p50']:.1f}", f"{ratio:.2f}" if ratio else "—", f"{1000 * ms['p90']:.1f}",
                         record["onnx"]["random_ops"], f"{record['onnx']['bytes']:,}"])
        size = report["dataset"]["sizes"]["train"][-1]
        lines += [f"Exported models ({size} training images, first seed), ONNX Runtime CPU, 1 thread, batch 1, "
                  "timed interleaved:", ""]
        lines += _table(["variant", "p50 µs", "× none", "p90 µs", "Dropout/random nodes", "file bytes"], rows)
        lines.append("")
    timings = report.get("mc_latency", {}).get("timings")
    if timings:
        batches = sorted({t["batch"] for t in timings.values()})
        header = ["model"] + [f"p50 µs, batch {b}" for b in batches] + [f"× deterministic, batch {b}" for b in batches]
        rows = []
        for model in ["deterministic", *(f"mc{n}" for n in report["config"]["mc_samples"])]:
            p50 = [timings[f"{model}@{b}"]["latency_ms"]["p50"] for b in batches]
            base = [timings[f"deterministic@{b}"]["latency_ms"]["p50"] for b in batches]
            rows.append([model, *(f"{1000 * v:.1f}" for v in p50), *(f"{v / w:.2f}" for v, w in zip(p50, base, strict=True))])
        lines += ["MC dropout models (the `dropout` model of the largest size, first seed; `probs` output), "
                  "ONNX Runtime CPU, 1 thread, timed interleaved:", ""]
        lines += _table(header, rows)
        lines.append("")
    return lines


def _unique(items: list[str]) -> list[str]:
    """In order, without repeats (`dropout` and `dropout_article` with one chosen rate are the same runs)."""
    return list(dict.fromkeys(items))


def render(report: dict, partial: bool = False) -> str:
    budget = report["budget"]
    config = report["config"]
    lines = [f"Generated by `tools/study_table.py` from study.json (created {report['created']}; "
             f"{report['seconds'] / 60:.0f} min wall). Data: {report['dataset']['source']}, "
             f"{report['dataset']['sizes']['val']} validation / {report['dataset']['sizes']['test']} test images; "
             f"CNN conv {','.join(map(str, config['conv_channels']))} / fc {','.join(map(str, config['fc_units']))}; "
             f"AdamW lr {config['lr']:g} constant, batch {config['batch_size']}, early stopping patience {config['patience']}.",
             ""]
    if partial:
        lines += ["**Partial study**: the run stopped before every size finished; only the sizes below are measured.", ""]
    lines += [f"Trainings: {budget['runs']}; best epoch = last epoch run in {budget['best_at_last_epoch']}; "
              f"stopped early in {budget['stopped_early']}.", ""]
    lines += size_tables(report) + mc_tables(report) + latency_tables(report)
    sentences = [row["sentence"] for block in report["by_size"] for row in block["variants"].values() if "sentence" in row]
    lines += ["Every comparison with `none`, as the study states it:", ""] + [f"- {s}" for s in _unique(sentences)]
    head_to_head = [c["sentence"] for block in report["by_size"] for c in block.get("comparisons", [])]
    if head_to_head:
        lines += ["", "Head to head (paired over the same seeds and test images):", ""] + [f"- {s}" for s in _unique(head_to_head)]
    calibration = []
    for block in report["by_size"]:
        for method, row in block.get("mc", {}).get("methods", {}).items():
            for base in ("deterministic", "temperature"):
                versus = row.get(f"vs_{base}")
                if versus and method.startswith("mc"):
                    calibration.append(f"{method} vs {base} at {block['train_size']} training images: NLL "
                                       f"{versus['nll']['verdict']}, ECE {versus['ece']['verdict']}, accuracy "
                                       f"{versus['accuracy']['verdict']}")
    if calibration:
        lines += ["", "MC dropout against its baselines (\"better\" = lower NLL or ECE, higher accuracy):", ""]
        lines += [f"- {s}" for s in calibration]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="study.json (or study.partial.json)")
    parser.add_argument("--readme", type=Path, help=f"replace the block between {START} and {END} in this file")
    args = parser.parse_args()
    try:
        report = json.loads(args.study.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read {args.study}: {exc}", file=sys.stderr)
        return 2
    text = render(report, partial=args.study.name.endswith(".partial.json"))
    if args.readme is None:
        sys.stdout.write(text)
        return 0
    readme = args.readme.read_text()
    if START not in readme or END not in readme:
        print(f"{args.readme} has no {START} ... {END} block", file=sys.stderr)
        return 2
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    args.readme.write_text(f"{head}{START}\n{text}{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
