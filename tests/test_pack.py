"""`pipeline pack` and the device runner: the unpacked bundle classifies without torch, refuses a
changed model, applies the manifest's session settings; extraction refuses escaping members."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline import artifacts
from pipeline.cli import app
from pipeline.config import PackConfig
from pipeline.pack import UnsafeArchiveError, extract, pack
from tests.test_predict import digits_test_split, reference_labels, to_8bit, write_pngs

REPO = Path(__file__).resolve().parent.parent

# Installed as `sitecustomize` on PYTHONPATH, so that the literal `python device_runner.py ...`
# runs in an interpreter where torch cannot be imported, as on a device without it.
NO_TORCH_SITECUSTOMIZE = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed on this device")
        return None
sys.meta_path.insert(0, _NoTorch())
"""


@pytest.fixture
def exported(exported_run_master) -> Path:
    """The shared exported tiny run (issue 3's `export_run`): read it, never change it."""
    return exported_run_master


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory) -> dict:
    shim = tmp_path_factory.mktemp("no_torch")
    (shim / "sitecustomize.py").write_text(NO_TORCH_SITECUSTOMIZE)
    return {**os.environ, "PYTHONPATH": str(shim)}


def run_device(bundle: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """`python device_runner.py ARGS` inside the unpacked bundle, from a folder outside the repo."""
    return subprocess.run([sys.executable, "device_runner.py", *args], cwd=bundle, env=env, capture_output=True,
                          text=True, timeout=120)


def unpack(exported: Path, tmp_path: Path, *variants: str) -> Path:
    out = tmp_path / "digits.tar.gz"
    pack(exported, PackConfig(out=out, variants=variants))
    return extract(out, tmp_path / "device") / "digits"


def test_shim_makes_torch_unimportable(no_torch_env, tmp_path):
    """Negative control for the device environment: torch really is gone there."""
    result = subprocess.run([sys.executable, "-c", "import torch"], cwd=tmp_path, env=no_torch_env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "torch is not installed" in result.stderr
    result = subprocess.run([sys.executable, "-c", "import onnxruntime, numpy, PIL"], cwd=tmp_path, env=no_torch_env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_bundle_classifies_pngs_without_torch(exported, no_torch_env, tmp_path):
    bundle = unpack(exported, tmp_path)
    assert sorted(p.name for p in bundle.iterdir()) == ["README.md", "SHA256SUMS", "device_runner.py", "golden", "labels.txt",
                                                         "manifest.json", "model.onnx"]
    raw, truth = digits_test_split(exported)
    expected = reference_labels(exported, raw)
    scale = artifacts.read_manifest(exported)["preprocess"]["scale"]
    pngs = write_pngs(tmp_path / "images", to_8bit(raw, scale))
    result = run_device(bundle, no_torch_env, *map(str, pngs))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(pngs)
    labels = np.array([int(line.split()[0]) for line in lines])  # the top label comes first on its line
    assert [line.split()[-1] for line in lines] == [str(p) for p in pngs]
    # A PNG the model classifies correctly from its raw pixels comes out correct on the device.
    right = np.flatnonzero(expected == truth)
    assert len(right) >= len(truth) // 2
    assert np.mean(labels[right] == truth[right]) >= 0.95
    assert np.mean(labels == expected) >= 0.95


def test_device_runner_agrees_with_predict(exported, no_torch_env, tmp_path):
    """Two implementations of the manifest's preprocessing (pipeline.predict and the standalone runner) give the same numbers."""
    bundle = unpack(exported, tmp_path)
    raw, _ = digits_test_split(exported, 6)
    scale = artifacts.read_manifest(exported)["preprocess"]["scale"]
    pngs = write_pngs(tmp_path / "images", to_8bit(raw, scale), size=20)
    result = run_device(bundle, no_torch_env, "--top-k", "2", *map(str, pngs))
    assert result.returncode == 0, result.stderr
    predicted = CliRunner().invoke(app, ["predict", str(exported), *map(str, pngs), "--json", "--top-k", "2"])
    assert predicted.exit_code == 0, predicted.output
    lines, predictions = result.stdout.splitlines(), json.loads(predicted.stdout)["predictions"]
    assert len(lines) == len(predictions) == len(pngs)
    for line, p in zip(lines, predictions, strict=True):
        fields = line.split()
        assert [fields[0], fields[2]] == [t["label"] for t in p["top"]]
        assert abs(float(fields[1]) - p["top"][0]["probability"]) < 1e-4


def test_tampered_model_is_refused_on_the_device(exported, no_torch_env, tmp_path):
    bundle = unpack(exported, tmp_path)
    raw, _ = digits_test_split(exported, 1)
    png = write_pngs(tmp_path / "images", to_8bit(raw, artifacts.read_manifest(exported)["preprocess"]["scale"]))[0]
    assert run_device(bundle, no_torch_env, str(png)).returncode == 0  # negative control: intact bundle runs
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    result = run_device(bundle, no_torch_env, str(png))
    assert result.returncode == 3
    assert "refused" in result.stderr and "sha256" in result.stderr
    assert result.stdout == ""


def test_device_runner_applies_the_manifests_session_settings(exported, tmp_path, monkeypatch):
    import onnxruntime as ort

    bundle = unpack(exported, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    record = manifest["artifacts"]["fp32"]
    record["runtime"] = {"graph_optimization_level": "basic", "disabled_optimizers": ["ConstantFolding"],
                         "intra_op_num_threads": 1}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    sys.path.insert(0, str(bundle))
    try:
        import device_runner
    finally:
        sys.path.remove(str(bundle))
    seen = {}
    real = ort.InferenceSession

    def spy(model, options, providers, disabled_optimizers):
        seen.update(level=options.graph_optimization_level, threads=options.intra_op_num_threads,
                    disabled=disabled_optimizers, providers=providers)
        return real(model, options, providers=providers, disabled_optimizers=disabled_optimizers)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    raw, _ = digits_test_split(exported, 1)
    png = write_pngs(tmp_path / "images", to_8bit(raw, manifest["preprocess"]["scale"]))[0]
    assert device_runner.main(["--bundle", str(bundle), str(png)]) == 0
    assert seen == {"level": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "threads": 1,
                    "disabled": ["ConstantFolding"], "providers": ["CPUExecutionProvider"]}
    record["runtime"]["graph_optimization_level"] = "fastest"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert device_runner.main(["--bundle", str(bundle), str(png)]) == 3  # an unknown setting is refused, not ignored


# --- the archive ----------------------------------------------------------------------------


def test_pack_is_deterministic_and_trimmed(exported, tmp_path):
    first = pack(exported, PackConfig(out=tmp_path / "a" / "digits.tar.gz"))
    second = pack(exported, PackConfig(out=tmp_path / "b" / "digits.tar.gz"))
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.path.read_bytes()[4:8] == b"\0\0\0\0"  # gzip header mtime 0
    assert first.sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest()
    with tarfile.open(first.path) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == ["digits", "digits/golden"] + sorted(n for n in names if n not in ("digits", "digits/golden"))
        assert {m.mtime for m in members} == {members[0].mtime} and {m.uid for m in members} == {0}
        shipped = json.load(tar.extractfile("digits/manifest.json"))
        sums = tar.extractfile("digits/SHA256SUMS").read().decode().splitlines()
        model = tar.extractfile("digits/model.onnx").read()
    source = artifacts.read_manifest(exported)
    assert set(shipped["artifacts"]) == {"fp32"} and shipped["recommended"] == "fp32"
    assert shipped["artifacts"]["fp32"]["sha256"] == hashlib.sha256(model).hexdigest() == source["artifacts"]["fp32"]["sha256"]
    assert "training" not in shipped and "checkpoint" not in json.dumps(shipped.get("dataset", {}))
    assert shipped["labels"] == source["labels"] and shipped["preprocess"] == source["preprocess"]
    assert f"{hashlib.sha256(model).hexdigest()}  model.onnx" in sums


def test_pack_cli_and_refusals(exported, tmp_path):
    out = tmp_path / "out.tar.gz"
    result = CliRunner().invoke(app, ["pack", str(exported), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["variants"] == ["fp32"] and out.is_file()

    before = out.read_bytes()
    result = CliRunner().invoke(app, ["pack", str(exported), "--out", str(out), "--variant", "int4"])
    assert result.exit_code == 4 and "int4" in result.output
    assert out.read_bytes() == before  # a failed pack leaves the old bundle as it was

    result = CliRunner().invoke(app, ["pack", str(exported), "--out", str(tmp_path / "x.zip")])
    assert result.exit_code == 2 and ".tar.gz" in result.output

    for args, fragment in ((["--sign", str(tmp_path / "no-such-key.pem")], "no-such-key.pem"),
                           (["--ort-format", "--golden", "0"], "golden")):
        result = CliRunner().invoke(app, ["pack", str(exported), "--out", str(out), *args])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and fragment in lines[0], result.output
        assert out.read_bytes() == before

    tampered = tmp_path / "run"
    shutil.copytree(exported, tampered)
    with open(tampered / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    result = CliRunner().invoke(app, ["pack", str(tampered), "--out", str(tmp_path / "t.tar.gz")])
    assert result.exit_code == 8 and "sha256" in result.output
    assert not (tmp_path / "t.tar.gz").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


# --- safe extraction ----------------------------------------------------------------------


def make_tar(path: Path, *members: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            payload = b"x" * member.size
            tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return path


def file_member(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 1
    return info


def link_member(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("members, reason", [
    ((file_member("bundle/ok.txt"), file_member("../evil.txt")), "'..'"),
    ((file_member("bundle/../../evil.txt"),), "'..'"),
    ((file_member("/tmp/evil.txt"),), "absolute"),
    ((link_member("bundle/etc", "/etc"),), "leaves the target"),
    ((link_member("bundle/up", "../../.."),), "leaves the target"),
    ((link_member("bundle/hard", "../outside", tarfile.LNKTYPE),), "leaves the target"),
    ((link_member("bundle/dev", "", tarfile.CHRTYPE),), "not a regular file"),
])
def test_extract_refuses_escaping_members(tmp_path, members, reason):
    archive = make_tar(tmp_path / "bad.tar.gz", *members)
    dest = tmp_path / "area" / "dest"
    with pytest.raises(UnsafeArchiveError, match=reason):
        extract(archive, dest)
    assert not dest.exists()
    assert sorted(p.name for p in (tmp_path / "area").iterdir()) == []  # nothing written, staging removed
    assert not (tmp_path / "evil.txt").exists()


def test_extract_accepts_links_that_stay_inside(tmp_path):
    """Negative control: a link within the bundle is fine."""
    archive = make_tar(tmp_path / "ok.tar.gz", file_member("bundle/model.onnx"), link_member("bundle/latest.onnx", "model.onnx"))
    dest = extract(archive, tmp_path / "dest")
    assert (dest / "bundle" / "latest.onnx").read_bytes() == b"x"


def test_signing_without_cryptography_is_one_line(tmp_path, monkeypatch):
    """The optional extra missing: a readable key gets the install hint; a wrong key path is named first."""
    import sys

    from pipeline.signing import SigningError, sign

    # As in a core install. Submodules an earlier test imported would still import by their full name.
    for name in [n for n in sys.modules if n == "cryptography" or n.startswith("cryptography.")] or ["cryptography"]:
        monkeypatch.setitem(sys.modules, name, None)
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(SigningError, match=r"needs the `cryptography` package: pip install 'pipeline\[sign\]'"):
        sign(b"data", key)
    with pytest.raises(SigningError, match="missing.pem: cannot read the signing key"):
        sign(b"data", tmp_path / "missing.pem")


def test_pack_beside_a_read_only_run_folder_is_refused_before_any_work(exported, tmp_path):
    """The default bundle path is beside the run folder: on a read-only filesystem that is one line, exit 4,
    naming --out (it was exit 70, 'a bug'). Negative control: the same run packs to a writable --out."""
    import subprocess

    from tests.test_all_or_nothing import _read_only_bind_mount

    view = tmp_path / "ro"
    if not _read_only_bind_mount(exported.parent, view):
        pytest.skip("needs a read-only bind mount (root on Linux)")
    try:
        result = CliRunner().invoke(app, ["pack", str(view / exported.name)])
        assert result.exit_code == 4, result.output
        assert "not writable" in result.output and "--out" in result.output and len(result.output.strip().splitlines()) == 1
        ok = CliRunner().invoke(app, ["pack", str(view / exported.name), "--out", str(tmp_path / "b.tar.gz")])
        assert ok.exit_code == 0, ok.output
    finally:
        subprocess.run(["umount", str(view)], capture_output=True)
