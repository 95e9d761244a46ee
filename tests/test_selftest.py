"""The bundle tests itself on the device: `device_runner.py --selftest`, --json, signatures, runtime requirements.

The device is simulated by a virtual environment made here in well under a second: `python -m venv
--without-pip`, with only onnxruntime, numpy and Pillow linked into its site-packages from the
project's environment. Installing them from the registry would take minutes and need the network;
hiding modules with a PYTHONPATH shim would leave everything else importable. In this venv `torch`,
`onnx` and `pipeline` do not exist, so the bundled runner proves it needs none of them (a negative
control checks they really are missing).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline import pack as pack_module
from pipeline.config import PackConfig
from pipeline.pack import extract, pack

DEVICE_PACKAGES = ("onnxruntime", "numpy", "numpy.libs", "PIL", "pillow.libs")
FAST = ("--budget", "0.3", "--rounds", "3")


@pytest.fixture(scope="session")
def device_python(tmp_path_factory) -> str:
    """A venv whose site-packages holds onnxruntime, numpy and Pillow only (linked, not installed)."""
    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    target = Path(subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                                 text=True, check=True, env=clean_env()).stdout.strip())
    source = Path(site.getsitepackages()[0])
    for name in DEVICE_PACKAGES:
        if (source / name).exists():
            (target / name).symlink_to(source / name)
    return str(python)


def clean_env(**extra: str) -> dict:
    """No PYTHONPATH (the tests set it to the worktree): the device sees only its own site-packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, **extra}


def runner(bundle: Path, python: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([python, "device_runner.py", *args], cwd=bundle, env=env or clean_env(), capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def archive(exported_run_master, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "digits.tar.gz"
    pack(exported_run_master, PackConfig(out=out, golden=12))
    return out


@pytest.fixture
def bundle(archive, tmp_path) -> Path:
    """A fresh unpacked copy of the fp32 bundle, free to modify."""
    return extract(archive, tmp_path / "device") / "digits"


def rewrite_sums(bundle: Path) -> None:
    """What an attacker (or a careless edit) would do: recompute SHA256SUMS after changing a file."""
    lines = []
    for line in (bundle / "SHA256SUMS").read_text().splitlines():
        _, name = line.split("  ", 1)
        lines.append(f"{hashlib.sha256((bundle / name).read_bytes()).hexdigest()}  {name}\n")
    (bundle / "SHA256SUMS").write_text("".join(lines))


def edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    rewrite_sums(bundle)


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


# --- the device environment -----------------------------------------------------------------


def test_device_venv_has_no_torch_onnx_or_pipeline(device_python, tmp_path):
    """Negative control: what the runner must not need is really absent there."""
    for module in ("torch", "onnx", "pipeline"):
        result = subprocess.run([device_python, "-c", f"import {module}"], cwd=tmp_path, env=clean_env(), capture_output=True,
                                text=True, timeout=60)
        assert result.returncode != 0 and "No module named" in result.stderr
    result = subprocess.run([device_python, "-c", "import onnxruntime, numpy, PIL"], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_bundled_runner_carries_the_timing_harness_verbatim(bundle):
    bundled = (bundle / "device_runner.py").read_text()
    assert pack_module.bundled_harness(bundled) == pack_module.TIMING.read_text()
    assert "from pipeline" not in bundled and "import pipeline" not in bundled
    # Negative control: the package's own runner imports the harness instead of carrying it.
    source = pack_module.RUNNER.read_text()
    assert "from pipeline import timing" in source and "_TIMING_SOURCE = r" not in source


# --- --selftest ---------------------------------------------------------------------------------


def test_selftest_passes_and_reports_like_bench(bundle, device_python):
    from pipeline.bench import RECORD_KEYS, TIMED_KEYS
    from pipeline.timing import TimingPlan

    result = runner(bundle, device_python, "--selftest", *FAST)
    assert result.returncode == 0, result.stderr
    assert "selftest passed" in result.stdout and "choice at batch 1" in result.stdout
    report = json.loads((bundle / "device_report.json").read_text())
    assert report["passed"] is True and report["versions"]["onnxruntime"]
    checks = {c["check"] for c in report["checks"]}
    assert {"sha256", "onnxruntime version", "png -> tensor", "max abs diff", "top-1 agreement"} <= checks
    assert set(report["plan"]) == {f for f in TimingPlan.__dataclass_fields__}
    timed = [r for r in report["timings"] if r["status"] == "ok"]
    assert {(r["artifact"], r["provider"], r["batch"]) for r in timed} == {("fp32", "cpu", 1), ("fp32", "cpu", 16)}
    for record in timed:  # the same fields as a bench.json record: comparable line by line
        assert set(RECORD_KEYS) | set(TIMED_KEYS) <= set(record)
    assert [c["batch"] for c in report["choice"]] == [1, 16]
    assert {"batch", "artifact", "engine", "provider", "threads", "p50_ms", "ratio_to_fp32", "host", "measured",
            "created"} <= set(report["choice"][0])
    assert report["bench_command"][0].startswith("pipeline bench --run")


@pytest.mark.parametrize("name", ["model.onnx", "golden/003.png", "golden/inputs.npy", "golden/logits.fp32.npy",
                                  "manifest.json", "labels.txt"])
def test_one_flipped_byte_fails_the_selftest_naming_the_file(bundle, device_python, name):
    flip_byte(bundle / name)
    result = runner(bundle, device_python, "--selftest", *FAST)
    assert result.returncode == 3
    line = one_line(result)
    assert line.startswith("refused: ") and name in line and "sha256" in line


def test_a_changed_golden_label_fails_the_selftest(bundle, device_python):
    def change(manifest):
        top1 = manifest["golden"]["outputs"]["fp32"]["top1"]
        top1[0] = next(label for label in manifest["labels"] if label != top1[0])

    edit_manifest(bundle, change)
    result = runner(bundle, device_python, "--selftest", *FAST)
    assert result.returncode == 4
    line = one_line(result)
    assert "variant fp32" in line and "top-1" in line and "91.7%" in line  # 11 of 12 agree
    assert json.loads((bundle / "device_report.json").read_text())["passed"] is False


def test_a_changed_golden_tensor_fails_the_png_check(bundle, device_python):
    inputs = np.load(bundle / "golden" / "inputs.npy")
    inputs[5, 0, 3, 3] += 0.5
    np.save(bundle / "golden" / "inputs.npy", inputs)
    edit_manifest(bundle, lambda m: m["files"].update({"golden/inputs.npy": hashlib.sha256(
        (bundle / "golden" / "inputs.npy").read_bytes()).hexdigest()}))
    result = runner(bundle, device_python, "--selftest", *FAST)
    assert result.returncode == 4
    assert "golden/005.png" in one_line(result)


def test_a_bundle_needing_a_newer_onnxruntime_is_refused(bundle, device_python, tmp_path):
    png = bundle / "golden" / "000.png"
    assert runner(bundle, device_python, str(png)).returncode == 0  # control
    edit_manifest(bundle, lambda m: m["requires"].update(onnxruntime="99.0"))
    for args in (("--selftest", *FAST), (str(png),)):
        result = runner(bundle, device_python, *args)
        assert result.returncode == 3
        assert one_line(result).startswith("refused: this bundle needs onnxruntime >= 99.0, found ")


def test_a_model_at_a_higher_opset_than_the_device_runtime_is_refused(exported_run_master, tmp_path, device_python):
    """opset 22 is beyond the table (ORT 1.20 implements 21): the bundle needs the packing host's onnxruntime,
    and a device with 1.20 (simulated: its onnxruntime reports 1.20.0) is refused before loading the model."""
    import onnx
    from onnx import version_converter

    from pipeline import artifacts

    run = tmp_path / "run"
    shutil.copytree(exported_run_master, run)
    model = version_converter.convert_version(onnx.load(str(run / "model.onnx")), 22)
    onnx.save(model, str(run / "model.onnx"))
    artifacts.update_manifest(run, lambda m: m["artifacts"]["fp32"].update(
        sha256=artifacts.sha256_file(run / "model.onnx"), bytes=(run / "model.onnx").stat().st_size, opset=22))
    pack(run, PackConfig(out=tmp_path / "digits.tar.gz", golden=4))
    bundle = extract(tmp_path / "digits.tar.gz", tmp_path / "device") / "digits"
    manifest = json.loads((bundle / "manifest.json").read_text())
    compat = manifest["artifacts"]["fp32"]["compat"]
    assert compat["opset_imports"]["ai.onnx"] == 22 and "newer than the last release in the table" in manifest["requires"]["basis"]
    import onnxruntime

    assert manifest["requires"]["onnxruntime"] == onnxruntime.__version__
    assert runner(bundle, device_python, "--selftest", *FAST).returncode == 0  # control: this host's runtime runs it
    shim = tmp_path / "old_runtime"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import onnxruntime\nonnxruntime.__version__ = '1.20.0'\n")
    result = runner(bundle, device_python, "--selftest", *FAST, env=clean_env(PYTHONPATH=str(shim)))
    assert result.returncode == 3
    assert one_line(result) == f"refused: this bundle needs onnxruntime >= {onnxruntime.__version__}, found 1.20.0"


def test_a_bundle_without_a_golden_set_still_checks_and_times(exported_run_master, tmp_path, device_python):
    pack(exported_run_master, PackConfig(out=tmp_path / "digits.tar.gz", golden=0))
    bundle = extract(tmp_path / "digits.tar.gz", tmp_path / "device") / "digits"
    assert not (bundle / "golden").exists()
    result = runner(bundle, device_python, "--selftest", *FAST)
    assert result.returncode == 0, result.stderr
    assert "no golden set in this bundle" in result.stdout and "choice at batch 1" in result.stdout


# --- classification for scripts ------------------------------------------------------------------


def test_json_reports_unreadable_images_and_classifies_the_rest(bundle, device_python, tmp_path):
    edit_manifest(bundle, lambda m: m.update(labels=[f"digit {label}" for label in m["labels"]]))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    good = [bundle / "golden" / "000.png", bundle / "golden" / "001.png"]
    result = runner(bundle, device_python, "--json", "--top-k", "2", str(good[0]), str(garbage), str(good[1]),
                    str(tmp_path / "missing.png"))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [("top" in r, "error" in r) for r in doc["images"]] == [(True, False), (False, True), (True, False), (False, True)]
    assert doc["classified"] == 2 and doc["unreadable"] == 2
    assert doc["variant"] == "fp32" and doc["engine"] == "onnxruntime" and set(doc["timings_ms"]) == {
        "session_create", "preprocess", "inference"}
    expected = "digit " + json.loads((bundle / "manifest.json").read_text())["golden"]["outputs"]["fp32"]["top1"][0]
    assert doc["images"][0]["top"][0]["label"] == expected  # the label's space survives
    assert len(doc["images"][0]["top"]) == 2
    assert runner(bundle, device_python, "--strict", str(good[0]), str(garbage)).returncode == 2
    assert runner(bundle, device_python, str(garbage)).returncode == 2  # none readable
    plain = runner(bundle, device_python, str(good[0]), str(garbage))
    assert plain.returncode == 0
    assert plain.stdout.split("\t")[0] == expected  # tab-separated: the label with a space is one field
    assert one_line(plain).startswith(f"error: cannot read {garbage}")


def test_later_runs_follow_the_selftest_choice_then_the_deployments(bundle, device_python):
    png = str(bundle / "golden" / "000.png")
    first = json.loads(runner(bundle, device_python, "--json", png).stdout)
    assert first["chosen_by"] == "manifest recommended"
    assert runner(bundle, device_python, "--selftest", *FAST).returncode == 0
    after = json.loads(runner(bundle, device_python, "--json", png).stdout)
    assert after["chosen_by"].startswith("device_report.json (self-test choice at batch 1)")
    named = json.loads(runner(bundle, device_python, "--json", "--variant", "fp32", png).stdout)
    assert named["chosen_by"] == "--variant"
    (bundle / "device_report.json").unlink()
    edit_manifest(bundle, lambda m: m.update(deployments=[
        {"batch": 1, "artifact": "fp32", "engine": "openvino", "provider": "cpu", "threads": 1, "p50_ms": 0.02,
         "ratio_to_fp32": 1.0, "host": "build", "measured": "bench", "created": "2026-12-02"},
        {"batch": 64, "artifact": "nope", "engine": "onnxruntime"}]))
    result = runner(bundle, device_python, "--json", png)
    doc = json.loads(result.stdout)
    assert doc["chosen_by"].startswith("manifest deployments") and doc["engine"] == "onnxruntime"
    assert one_line(result).startswith("note: the recommended deployment at batch 1 uses engine 'openvino'")
    edit_manifest(bundle, lambda m: m["deployments"][0].update(engine="onnxruntime", provider="tensorrt"))
    result = runner(bundle, device_python, "--json", png)
    assert json.loads(result.stdout)["provider"] == "cpu" and "provider 'tensorrt'" in one_line(result)
    edit_manifest(bundle, lambda m: m["deployments"][0].update(provider="cpu"))
    result = runner(bundle, device_python, "--json", png)
    assert json.loads(result.stdout)["provider"] == "cpu" and result.stderr == ""  # followed as recommended


def test_within_noise_verdict_from_paired_round_ratios(bundle):
    sys.path.insert(0, str(bundle))
    try:
        import device_runner
    finally:
        sys.path.remove(str(bundle))
    assert device_runner._ratio_verdict([1.0, 1.1, 0.9], [1.0, 1.0, 1.0])[1] == "within noise"
    assert device_runner._ratio_verdict([0.5, 0.6, 0.55], [1.0, 1.0, 1.0])[1] == "faster"
    assert device_runner._ratio_verdict([0.5, 0.6], [1.0, 1.0])[0] == [0.5, 0.6]


# --- signatures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("cryptography")
    from pipeline.signing import write_keypair

    folder = tmp_path_factory.mktemp("keys")
    write_keypair(folder / "key.pem", folder / "key.pub.pem")
    return folder / "key.pem", folder / "key.pub.pem"


def signed_bundle(exported: Path, tmp_path: Path, key: Path | None) -> Path:
    out = tmp_path / "signed" / "digits.tar.gz"
    pack(exported, PackConfig(out=out, golden=4, sign_key=key))
    return extract(out, tmp_path / "device") / "digits"


def with_crypto(*args: str) -> list[str]:
    return [sys.executable, "device_runner.py", *args]  # the project's env has cryptography; the device venv may not


@pytest.mark.slow  # eight refused bundles, each a fresh interpreter (about 7 s on 2 loaded cores)
def test_signed_bundle_verifies_and_any_changed_byte_is_refused(exported_run_master, tmp_path, keys):
    private, public = keys
    bundle = signed_bundle(exported_run_master, tmp_path, private)
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert "SIGNATURE" in files

    def verify(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(with_crypto("--selftest", *FAST, "--verify-key", str(public), *extra), cwd=bundle,
                              env=clean_env(), capture_output=True, text=True, timeout=180)

    assert verify().returncode == 0, verify().stderr
    (bundle / "device_report.json").unlink()
    # One changed byte anywhere is refused (the runner's own byte inside its docstring, so that it still runs).
    for name in ("model.onnx", "manifest.json", "SHA256SUMS", "SIGNATURE", "README.md", "labels.txt", "golden/000.png",
                 "device_runner.py"):
        original = (bundle / name).read_bytes()
        flip_byte(bundle / name, 0.02 if name == "device_runner.py" else 0.3)
        result = verify()
        assert result.returncode == 3, name
        assert one_line(result).startswith("refused: "), name
        (bundle / name).write_bytes(original)
    # A consistent edit (file and SHA256SUMS changed together) still fails on the signature.
    edit_manifest(bundle, lambda m: m.update(recommended="fp32 "))
    assert "signature" in one_line(verify())


def test_unsigned_bundle_is_refused_with_a_key(exported_run_master, tmp_path, keys):
    _, public = keys
    bundle = signed_bundle(exported_run_master, tmp_path, None)
    result = subprocess.run(with_crypto("--selftest", *FAST, "--verify-key", str(public)), cwd=bundle, env=clean_env(),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 3 and "unsigned" in one_line(result)


def test_runner_imports_cryptography_only_for_verify_key(bundle, device_python, tmp_path):
    """The device venv has no cryptography: --selftest works, --verify-key says what to install."""
    assert runner(bundle, device_python, "--selftest", *FAST).returncode == 0
    (tmp_path / "k.pub").write_bytes(b"x" * 32)
    result = runner(bundle, device_python, "--selftest", *FAST, "--verify-key", str(tmp_path / "k.pub"))
    assert result.returncode == 3 and "cryptography" in one_line(result)


# --- int8, ORT format, the pack-time facts -------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(exported_run_master, tmp_path_factory) -> Path:
    from pipeline.config import QuantizeConfig
    from pipeline.workflow import quantize_run

    out = tmp_path_factory.mktemp("quantized") / "digits"
    shutil.copytree(exported_run_master, out)
    quantize_run(out, QuantizeConfig(speed_check=False))
    return out


@pytest.mark.slow
def test_int8_and_ort_format_bundle_passes_its_selftest(quantized, tmp_path, device_python):
    out = tmp_path / "digits.tar.gz"
    pack(quantized, PackConfig(out=out, variants=("fp32", "int8"), ort_format=True))
    bundle = extract(out, tmp_path / "device") / "digits"
    manifest = json.loads((bundle / "manifest.json").read_text())
    for variant in ("fp32", "int8"):
        record = manifest["artifacts"][variant]
        assert record["ort_format"]["max_abs_diff_vs_onnx"] <= 1e-6 and (bundle / record["ort_format"]["file"]).is_file()
        assert set(record["mobile_usability"]["execution_providers"]) == {"NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram"}
        assert record["compat"]["onnxruntime_min"] == "1.14"  # opset 18 at IR 8 (the export lowers onnx's IR 10)
    config = (bundle / "required_operators.config").read_text()
    assert "ai.onnx;" in config and "/tmp" not in config
    result = runner(bundle, device_python, "--selftest", *FAST)
    assert result.returncode == 0, result.stderr
    report = json.loads((bundle / "device_report.json").read_text())
    ort_checks = [c for c in report["checks"] if c["check"] == ".ort = .onnx"]
    assert len(ort_checks) == 2 and all(c["value"] <= 1e-6 for c in ort_checks)
    assert {c["artifact"] for c in report["choice"]} <= {"fp32", "int8"}
    assert {r["artifact"] for r in report["timings"]} == {"fp32", "int8"}
    from typer.testing import CliRunner

    from pipeline.cli import app

    facts = json.loads(CliRunner().invoke(app, ["inspect", str(bundle / "model.int8.onnx"), "--json"]).stdout)
    assert facts["manifest"]["ort_format"]["file"] == "model.int8.ort"
    assert facts["manifest"]["mobile_usability"]["execution_providers"]["NNAPI"]["suitability"] in ("YES", "MAYBE", "NO")
    shown = CliRunner().invoke(app, ["inspect", str(bundle / "model.int8.onnx")]).output
    assert "mobile: NNAPI" in shown and "ORT format" in shown
    # A flipped byte in an .ort file is refused like any other file.
    flip_byte(bundle / "model.int8.ort")
    assert "model.int8.ort" in one_line(runner(bundle, device_python, "--selftest", *FAST))


def test_pack_records_golden_answers_and_requirements(archive):
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("digits/manifest.json"))
        names = tar.getnames()
        runner_bytes = tar.extractfile("digits/device_runner.py").read()
    golden = manifest["golden"]
    assert golden["count"] == 12 and golden["split"] == "test" and len(golden["truth"]) == 12
    assert all(f"digits/{name}" in names for name in golden["images"] + [golden["inputs"]])
    fp32 = golden["outputs"]["fp32"]
    assert fp32["max_abs_diff"] == manifest["artifacts"]["fp32"]["verification"]["tolerance"] and len(fp32["top1"]) == 12
    assert manifest["requires"]["onnxruntime"] == manifest["artifacts"]["fp32"]["compat"]["onnxruntime_min"]
    assert manifest["files"]["device_runner.py"] == hashlib.sha256(runner_bytes).hexdigest()
    assert "manifest.json" not in manifest["files"]  # it cannot hold its own hash: SHA256SUMS does


@pytest.mark.parametrize("resize", ["squash", "crop", "pad"])
def test_runner_reads_images_as_training_did(tmp_path, resize):
    """The device follows the manifest's resize mode, 16-bit scaling and EXIF rule exactly as the decoded-image
    cache did in training; another mode gives other pixels (negative control); an unknown mode is refused."""
    from PIL import Image

    from pipeline import device_runner, images

    rng = np.random.default_rng(0)
    wide = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 255, (6, 10, 3), dtype=np.uint8)).save(wide)
    deep = tmp_path / "deep.png"
    Image.fromarray((rng.integers(0, 65535, (6, 10))).astype(np.uint16)).save(deep)  # 16-bit gray
    for path, channels in ((wide, 3), (deep, 1)):
        preprocess = {"size": [4, 4], "channels": channels, "mean": [0.0] * channels, "std": [1.0] * channels,
                      "resize": resize}
        trained = images.decode(path, (4, 4), channels, resize).astype(np.float32) / 255.0
        assert np.abs(device_runner.load_image(str(path), preprocess) - trained).max() < 1e-6
        other = "pad" if resize != "pad" else "crop"
        assert np.abs(device_runner.load_image(str(path), {**preprocess, "resize": other}) - trained).max() > 0.01
    with pytest.raises(device_runner.Refused, match="resize mode 'stretch'"):
        device_runner.load_image(str(wide), {**preprocess, "resize": "stretch"})


def test_without_the_deployments_engine_the_runner_takes_the_file_fastest_on_onnxruntime(tmp_path):
    from pipeline import device_runner

    deployment = {"batch": 256, "artifact": "int8", "engine": "openvino", "onnxruntime_artifact": "int8-space-to-depth"}
    manifest = {"artifacts": {"fp32": {}, "int8": {}, "int8-space-to-depth": {}}, "recommended": "int8",
                "deployments": [deployment]}
    chosen = device_runner.choose(str(tmp_path), manifest, "sha", None, 256)
    assert chosen["artifact"] == "int8-space-to-depth" and chosen["engine"] == "onnxruntime"
    assert "using int8-space-to-depth on onnxruntime" in chosen["note"]
    # Negative control: a bundle without that file runs the deployment's own artifact on onnxruntime.
    del manifest["artifacts"]["int8-space-to-depth"]
    assert device_runner.choose(str(tmp_path), manifest, "sha", None, 256)["artifact"] == "int8"
