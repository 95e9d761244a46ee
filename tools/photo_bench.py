"""Benchmark: a user's photo folder at scale (issue 18). Not a test: it prints and writes numbers.

    python tools/photo_bench.py [--images 100000] [--workdir /tmp/photo-bench] [--json out.json]

1. Generates a folder of N 64x64 RGB PNGs in 10 class folders (skipped when it is there already).
2. Decode throughput: the first `--decode-sample` images decoded into a scratch cache with 1 worker
   and with every core (images/s each).
3. `pipeline train` (1 epoch, a narrow CNN) and `pipeline export --quantize` as subprocesses, with
   the peak resident memory of each (ru_maxrss of RUSAGE_CHILDREN in a fresh helper process whose
   only child is the command: its peak, or a decode worker's if larger). Acceptance: train < 2 GB,
   export --quantize < 1.5 GB.
4. The second command does not decode again: the cache holds one entry, untouched by export.
5. Export from another working directory on a copy of the run folder moved elsewhere; the source
   changed (one image added) is refused.
6. A 1,000-image folder with a truncated PNG, a 0-byte PNG and `._x.png`: `--on-bad-image skip`
   trains and lists the 2 bad files, the default fails naming both.

Everything is written under --workdir; `--clean` deletes it at the end (the 100k folder is ~1 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CLASSES = 10
SIZE = 64
TRAIN_ARGS = ["--epochs", "1", "--conv-channels", "8,16", "--fc-units", "32", "--batch-size", "128", "-q"]


def _write_chunk(root: str, start: int, stop: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed + start)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for i in range(start, stop):
        label = i % CLASSES
        # A class-dependent colour gradient plus noise: learnable, and compresses like a small photo (~4-8 KB).
        angle = 2 * np.pi * label / CLASSES
        wave = (np.cos(angle) * xx + np.sin(angle) * yy) / SIZE
        base = np.stack([128 + 90 * np.sin(2 * np.pi * (wave + c / 3)) for c in range(3)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="RGB").save(Path(root) / f"class_{label}" / f"{i:06d}.png", compress_level=1)


def generate(folder: Path, count: int, workers: int) -> float:
    """N PNGs in class_0..class_9; returns seconds (0 when the folder was complete already)."""
    marker = folder / ".complete"
    if marker.is_file() and marker.read_text() == str(count):
        return 0.0
    shutil.rmtree(folder, ignore_errors=True)
    for label in range(CLASSES):
        (folder / f"class_{label}").mkdir(parents=True)
    started = time.perf_counter()
    step = 2000
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_chunk, [str(folder)] * len(range(0, count, step)), range(0, count, step),
                      [min(s + step, count) for s in range(0, count, step)], [0] * len(range(0, count, step))))
    marker.write_text(str(count))
    return time.perf_counter() - started


def run_measured(args: list[str], cwd: Path | None = None) -> dict:
    """Run `python -m pipeline ARGS`; exit code, seconds, peak RSS (MB) and the last stderr line."""
    import resource

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    # The largest peak of any child this process waited for (and of their own reaped children, the decode
    # workers): this command's peak when it is the only child, as in `run_peak`.
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return {"command": "pipeline " + " ".join(args), "exit_code": done.returncode, "seconds": round(seconds, 1),
            "peak_rss_mb": round(peak_kb / 1024, 1), "stdout": done.stdout.strip()[-300:],
            "stderr_last": (lines or [""])[-1][:400]}


def run_peak(args: list[str], cwd: Path | None = None) -> dict:
    """`run_measured` in a fresh helper process, so RUSAGE_CHILDREN holds this command's peak only."""
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from tools.photo_bench import run_measured; "
            "print(json.dumps(run_measured(json.loads(sys.argv[1]), json.loads(sys.argv[2]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args), json.dumps(str(cwd) if cwd else None)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def decode_rate(folder: Path, cache: Path, sample: int, workers: int) -> dict:
    sys.path.insert(0, str(REPO))
    from pipeline import folder as source

    listing = source.list_folder(folder)
    keep = slice(0, min(sample, len(listing.files)))
    subset = source.FolderListing(listing.root, listing.classes, listing.files[keep], listing.labels[keep],
                                  listing.stats[keep], ())
    shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    source.build(subset, (SIZE, SIZE), 3, "squash", cache, workers=workers)
    seconds = time.perf_counter() - started
    shutil.rmtree(cache, ignore_errors=True)
    return {"workers": workers, "images": len(subset.files), "seconds": round(seconds, 2),
            "images_per_second": round(len(subset.files) / seconds, 1)}


def bad_folder_check(work: Path) -> dict:
    folder = work / "bad-folder"
    generate(folder, 1000, os.cpu_count() or 1)
    good = (folder / "class_0" / "000000.png").read_bytes()
    (folder / "class_0" / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "class_1" / "empty.png").write_bytes(b"")
    (folder / "class_2" / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    common = ["train", "--dataset", "folder", "--data-dir", str(folder), "--cache-dir", str(work / "bad-cache"), *TRAIN_ARGS]
    failed = run_measured([*common, "--out", str(work / "bad-fail")])
    skipped = run_measured([*common, "--on-bad-image", "skip", "--out", str(work / "bad-skip"), "--force"])
    listed = json.loads((work / "bad-skip" / "skipped_images.json").read_text()) if skipped["exit_code"] == 0 else {}
    return {"default_fail": {"exit_code": failed["exit_code"], "message": failed["stderr_last"]},
            "skip": {"exit_code": skipped["exit_code"], "unreadable": listed.get("unreadable")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/photo-bench"))
    parser.add_argument("--decode-sample", type=int, default=5000, help="Images decoded for the 1-vs-N worker rates.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--clean", action="store_true", help="Delete --workdir at the end.")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    photos, cache, run = work / f"photos-{args.images}", work / "cache", work / "run"
    results: dict = {"images": args.images, "cores": cores, "cpu": _cpu(), "python": sys.version.split()[0]}

    results["generate_seconds"] = round(generate(photos, args.images, cores), 1)
    results["folder_mb"] = round(sum(p.stat().st_size for p in photos.rglob("*.png")) / 2**20, 1)
    print(f"folder: {args.images} PNGs, {results['folder_mb']} MB", flush=True)
    results["decode"] = [decode_rate(photos, work / "decode-scratch", args.decode_sample, n) for n in sorted({1, cores})]
    print("decode:", results["decode"], flush=True)

    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    train = run_peak(["train", "--dataset", "folder", "--data-dir", str(photos), "--cache-dir", str(cache),
                      "--out", str(run), *TRAIN_ARGS])
    print("train:", train, flush=True)
    entries = sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
    stamp = [(p / "images.npy").stat().st_mtime_ns for p in entries]
    export = run_peak(["export", "--run", str(run), "--quantize"])
    print("export --quantize:", export, flush=True)
    after = sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
    results["train"], results["export_quantize"] = train, export
    results["second_command_decoded_again"] = not (after == entries and len(entries) == 1
                                                   and [(p / "images.npy").stat().st_mtime_ns for p in after] == stamp)
    if entries:
        index = json.loads((entries[0] / "index.json").read_text())
        results["cache"] = {"entries": len(after), "mb": round((entries[0] / "images.npy").stat().st_size / 2**20, 1),
                            "decode_seconds_in_train": index["decode"]["seconds"], "workers": index["decode"]["workers"]}

    moved = work / "moved" / "run-copy"
    shutil.rmtree(moved.parent, ignore_errors=True)
    moved.parent.mkdir(parents=True)
    shutil.copytree(run, moved)
    elsewhere = work / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    results["moved_export_other_cwd"] = run_peak(["export", "--run", str(moved)], cwd=elsewhere)
    extra = photos / "class_0" / "zz-extra.png"
    shutil.copyfile(photos / "class_1" / "000001.png", extra)
    changed = run_measured(["export", "--run", str(moved)], cwd=elsewhere)
    extra.unlink()
    results["changed_source_export"] = {"exit_code": changed["exit_code"], "message": changed["stderr_last"]}
    results["bad_files"] = bad_folder_check(work)

    print(json.dumps({k: v for k, v in results.items()}, indent=2))
    gb = 1024
    print(f"ACCEPTANCE: train peak {train['peak_rss_mb'] / gb:.2f} GB (< 2), export --quantize peak "
          f"{export['peak_rss_mb'] / gb:.2f} GB (< 1.5), second command decoded again: "
          f"{results['second_command_decoded_again']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
