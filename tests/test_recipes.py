"""int8 recipes searched, not fixed: which candidate ships, and the guarantee against ORT's default recipe.

Structural: the choice is checked on given latency tables (never timed here); the search itself on a
real export is in the slow tests of test_quantize.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import quantize
from pipeline.config import QuantizeConfig
from pipeline.quantize import Candidate


class Passed:
    """Stands in for a QuantizeResult: the choice reads only whether a candidate passed."""

    accuracy, agreement, drop_points, excluded = 0.98, 0.999, 0.1, ()


def candidate(name: str, passed: bool = True) -> Candidate:
    return Candidate(name, quantize.recipe_config(QuantizeConfig(), name), Path(f"model.int8.{name}.onnx"),
                     Passed() if passed else None, None if passed else "gate failed")


def speed(**ms: tuple[float, float]) -> dict:
    """{recipe: (batch-1 ms, batch-256 ms)} with fp32 at (1.0, 10.0)."""
    return {"batch_1": {"fp32_ms": 1.0, **{f"{k}_ms": v[0] for k, v in ms.items()}},
            "batch_256": {"fp32_ms": 10.0, **{f"{k}_ms": v[1] for k, v in ms.items()}}}


def test_the_fastest_candidate_ships():
    cands = [candidate("default"), candidate("ort-defaults"), candidate("per-channel")]
    chosen, why = quantize.choose_candidate(cands, speed(**{"default": (0.5, 5.0), "ort-defaults": (0.6, 6.0),
                                                           "per-channel": (0.4, 4.5)}), 0.05)
    assert chosen.recipe == "per-channel" and "per-channel" in why


def test_a_candidate_slower_than_ort_defaults_at_one_batch_never_ships():
    # "default" has the best geometric mean but is 20% slower than ORT's defaults at batch 1.
    cands = [candidate("default"), candidate("ort-defaults")]
    table = speed(**{"default": (0.6, 2.0), "ort-defaults": (0.5, 6.0)})
    assert quantize.choose_candidate(cands, table, 0.05)[0].recipe == "ort-defaults"
    # Negative control: with a tolerance wide enough to call 20% noise, the better geometric mean wins.
    assert quantize.choose_candidate(cands, table, 0.25)[0].recipe == "default"


def test_a_candidate_is_judged_at_its_fastest_engine_per_batch():
    # ORT alone: ort-defaults is faster at both batches. With OpenVINO timing "default" at batch 256 in 2.0 ms,
    # "default" wins: at its best engine it is nowhere slower than ort-defaults at its best.
    cands = [candidate("default"), candidate("ort-defaults")]
    table = speed(**{"default": (0.5, 6.0), "ort-defaults": (0.5, 5.0)})
    assert quantize.choose_candidate(cands, table, 0.05)[0].recipe == "ort-defaults"
    table["batch_256"]["default@openvino_ms"] = 2.0
    chosen, why = quantize.choose_candidate(cands, table, 0.05)
    assert chosen.recipe == "default" and "batch 256 on openvino" in why and "batch 1 on onnxruntime" in why
    row = quantize.candidate_records(cands, table, "default", False)[0]["latency"]["batch_256"]
    assert (row["ms"], row["engine"], row["onnxruntime_ms"], row["openvino_ms"]) == (2.0, "openvino", 6.0, 2.0)


def test_failed_candidates_are_never_chosen_and_without_ort_defaults_all_passing_are_eligible():
    cands = [candidate("default"), candidate("ort-defaults", passed=False), candidate("per-channel", passed=False)]
    chosen, _ = quantize.choose_candidate(cands, speed(default=(0.9, 9.0)), 0.05)
    assert chosen.recipe == "default"


def test_recipes_default_to_all_only_when_the_speed_check_can_tell_them_apart():
    assert quantize.recipes_to_try(QuantizeConfig()) == tuple(quantize.RECIPES)
    assert quantize.recipes_to_try(QuantizeConfig(speed_check=False)) == ("default",)
    assert quantize.recipes_to_try(QuantizeConfig(mode="dynamic")) == ("default",)
    assert quantize.recipes_to_try(QuantizeConfig(recipes=("ort-defaults",))) == ("ort-defaults",)
    with pytest.raises(ValueError, match="unknown int8 recipe"):
        QuantizeConfig(recipes=("fastest",))


def test_ort_defaults_is_onnxruntimes_own_default_recipe():
    config = quantize.recipe_config(QuantizeConfig(per_channel=True, keep_first_conv_fp32=True, flatten_nhwc=True,
                                                   signed_input=True), "ort-defaults")
    assert (config.format, config.activation_type, config.weight_type, config.per_channel) == ("qdq", "int8", "int8", False)
    assert not config.flatten_nhwc and not config.signed_input  # the pipeline's own graph rewrites are not ORT's
    assert config.keep_first_conv_fp32 is False and config.disabled_optimizers == () and config.pre_process
    assert config.max_accuracy_drop == QuantizeConfig().max_accuracy_drop  # the gate is the same for every recipe


def test_candidate_records_list_every_recipe_with_ratios_to_fp32_and_ort_defaults():
    cands = [candidate("default"), candidate("ort-defaults"), candidate("per-channel", passed=False)]
    rows = quantize.candidate_records(cands, speed(**{"default": (0.5, 5.0), "ort-defaults": (0.6, 6.0)}), "default", False)
    assert [r["recipe"] for r in rows] == ["default", "ort-defaults", "per-channel"]
    assert rows[0]["shipped"] and rows[0]["latency"]["batch_1"] == {
        "ms": 0.5, "engine": "onnxruntime", "ratio_to_fp32": 0.5, "ratio_to_ort_defaults": pytest.approx(0.8333, abs=1e-4),
        "onnxruntime_ms": 0.5}
    assert not rows[2]["passed"] and rows[2]["error"] and "latency" not in rows[2]


def test_a_kept_candidate_names_its_file_unless_it_shipped_as_a_per_batch_file():
    cands = [candidate("default"), candidate("per-channel")]
    table = speed(**{"default": (0.5, 5.0), "per-channel": (0.4, 6.0)})
    kept = quantize.candidate_records(cands, table, "default", True)
    assert kept[1]["file"] == "model.int8.per-channel.onnx" and "file" not in kept[0]
    moved = quantize.candidate_records(cands, table, "default", True, per_batch=("per-channel",))
    assert "file" not in moved[1]  # it is the artifact int8-per-channel now, not a kept candidate


def test_a_failing_recipe_is_listed_with_its_numbers_and_all_failing_raises_the_gate_error(monkeypatch, tmp_path):
    def gated(fp32_path, out_path, config, *rest):
        if config.per_channel:
            raise quantize.AccuracyGateError("per-channel lost 2 points", 0.98, 0.96, 2.0, 0.97, ("conv1",))
        return Passed()

    monkeypatch.setattr(quantize, "quantize_gated", gated)
    config = QuantizeConfig(recipes=("default", "per-channel"))
    found = quantize.build_candidates(Path("m.onnx"), tmp_path, config, None, None, None, None)
    assert [(c.recipe, c.passed) for c in found] == [("default", True), ("per-channel", False)]
    assert found[1].numbers["drop_points"] == 2.0 and found[1].numbers["excluded_nodes"] == ["conv1"]
    with pytest.raises(quantize.AccuracyGateError, match="lost 2 points") as info:
        quantize.build_candidates(Path("m.onnx"), tmp_path, QuantizeConfig(recipes=("per-channel",)), None, None, None, None)
    assert info.value.drop_points == 2.0


def test_a_recipe_equal_to_the_configured_one_is_built_once(monkeypatch, tmp_path):
    built = []
    monkeypatch.setattr(quantize, "quantize_gated", lambda fp32, out, config, *rest: built.append(out.name) or Passed())
    quantize.build_candidates(Path("m.onnx"), tmp_path, QuantizeConfig(per_channel=True, recipes=("default", "per-channel")),
                              None, None, None, None)
    assert built == ["model.int8.default.onnx"]


@pytest.mark.slow
@pytest.mark.parametrize("keep", [False, True])
def test_export_searches_recipes_ships_one_and_records_every_candidate(exported_run, keep):
    from pipeline import artifacts
    from pipeline.workflow import quantize_run

    config = QuantizeConfig(speed_seconds=0.02, speed_rounds=1, speed_batch=32, recipes=("default", "ort-defaults"),
                            keep_candidates=keep)
    quantize_run(exported_run, config)
    manifest = artifacts.read_manifest(exported_run)
    recipe = manifest["artifacts"]["int8"]["quantization"]
    rows = {c["recipe"]: c for c in recipe["candidates"]}
    assert set(rows) == {"default", "ort-defaults"} and [c["shipped"] for c in rows.values()].count(True) == 1
    assert recipe["recipe"] in rows and rows[recipe["recipe"]]["shipped"]
    assert rows[recipe["recipe"]]["passed"]
    # ort-defaults (S8S8) may fail the gate on the tiny run on hosts without VNNI; a ratio to it exists only if it passed.
    expected = {"ms", "ratio_to_fp32"} | ({"ratio_to_ort_defaults"} if rows["ort-defaults"]["passed"] else set())
    for row in (r for r in rows.values() if r["passed"]):
        assert 0 <= row["validation_accuracy"] <= 1 and 0 <= row["agreement"] <= 1
        assert set(row["latency"]) == {"batch_1", "batch_32"}
        assert all(expected <= set(v) for v in row["latency"].values()), row["latency"]
    # The shipped file is the chosen candidate's: its quantization metadata names that recipe's activation type.
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(exported_run / "model.int8.onnx")).metadata_props}
    activation = "int8" if recipe["recipe"] == "ort-defaults" else "uint8"
    assert f"a={activation} " in meta["pipeline.quantization"] and recipe["activation_type"] == activation
    other = next(name for name in rows if name != recipe["recipe"])
    leftovers = sorted(p.name for p in exported_run.glob("model.int8.*.onnx"))
    # Only candidates that passed their gate are kept, and one that shipped as a per-batch file is that file.
    kept = keep and rows[other]["passed"] and f"int8-{other}" not in manifest["artifacts"]
    assert leftovers == ([f"model.int8.{other}.onnx"] if kept else [])
    assert ("file" in rows[other]) is kept
    # Besides fp32 and int8, only the other candidate as a per-batch file (when it won a batch size on some engine,
    # or on ONNX Runtime alone where another engine won), and then with the batch sizes it ships for.
    per_batch = set(manifest["artifacts"]) - {"fp32", "int8"}
    assert per_batch <= {f"int8-{other}"}
    assert all(manifest["artifacts"][name]["quantization"]["shipped_for"] for name in per_batch)
    # One deployment per measured batch size, in exactly the documented shape.
    assert [d["batch"] for d in manifest["deployments"]] == [1, 32]
    for d in manifest["deployments"]:
        fallback = ["onnxruntime_artifact"] if d["engine"] != "onnxruntime" else []
        assert list(d) == ["batch", "artifact", "engine", "provider", "threads", "p50_ms", "ratio_to_fp32", "host",
                           "measured", "created", *fallback]
        assert d["artifact"] in manifest["artifacts"] and d["measured"] == "export speed check"
        assert d["threads"] >= 1 and set(d["host"]) == {"machine", "processor", "cpu_count"}


# --- a candidate that wins one batch size ships too, for that batch size --------------------------------


def test_a_candidate_faster_at_one_batch_ships_for_that_batch():
    cands = [candidate("default"), candidate("per-channel")]
    # default has the better geometric mean and ships; per-channel is 25% faster at batch 1.
    table = speed(**{"default": (0.8, 4.0), "per-channel": (0.6, 6.0)})
    shipped, _ = quantize.choose_candidate(cands, table, 0.05)
    assert shipped.recipe == "default"
    assert quantize.per_batch_files(cands, table, shipped) == {"per-channel": ["batch_1"]}


def test_a_per_batch_file_needs_more_than_the_margin_and_a_passed_gate():
    cands = [candidate("default"), candidate("per-channel")]
    shipped = cands[0]
    # Negative controls, each removing one condition: within the 3% margin; the faster candidate failed its gate.
    assert quantize.per_batch_files(cands, speed(**{"default": (0.8, 4.0), "per-channel": (0.79, 6.0)}), shipped) == {}
    failed = [cands[0], candidate("per-channel", passed=False)]
    assert quantize.per_batch_files(failed, speed(**{"default": (0.8, 4.0), "per-channel": (0.6, 6.0)}), shipped) == {}
    # Just past the margin it ships.
    assert quantize.per_batch_files(cands, speed(**{"default": (0.8, 4.0), "per-channel": (0.77, 6.0)}), shipped) == {
        "per-channel": ["batch_1"]}


def test_a_per_batch_file_is_judged_at_its_fastest_engine():
    cands = [candidate("default"), candidate("per-channel")]
    table = speed(**{"default": (0.8, 4.0), "per-channel": (0.8, 6.0)})
    table["batch_256"]["per-channel@openvino_ms"] = 3.0  # 25% faster than default's best, on OpenVINO
    assert quantize.per_batch_files(cands, table, cands[0]) == {"per-channel": ["batch_256"]}


def fake_speed_check(p50: dict, elsewhere: dict | None = None):
    """A stand-in for `quantize.speed_check` returning `p50` ({name: (batch-1 ms, large-batch ms)}), and
    `elsewhere` ({"<name>@<engine>": (batch-1 ms, large-batch ms)}) as if another engine had been timed."""

    def check(models, x, config, other_engines=None):
        table = {"threads": None, "rounds": 15, "seconds_per_round": 0.0}
        for i, batch in enumerate((1, config.speed_batch)):
            entry = {f"{name}_ms": p50[name][i] for name in models}
            entry.update({f"{name}_ms": ms[i] for name, ms in (elsewhere or {}).items()})
            entry.update({f"{name}_ratio": p50[name][i] / p50["fp32"][i] for name in models if name != "fp32"})
            table[f"batch_{batch}"] = entry
        return table

    return check


@pytest.mark.slow
def test_a_per_batch_file_ships_with_its_deployment_and_is_removed_when_it_no_longer_wins(exported_run, monkeypatch):
    from pipeline import artifacts, deployments, engines
    from pipeline.workflow import quantize_run

    config = QuantizeConfig(speed_batch=32, recipes=("default", "per-channel"), engines=("onnxruntime",))
    monkeypatch.setattr(quantize, "speed_check", fake_speed_check(
        {"fp32": (1.0, 10.0), "default": (0.8, 4.0), "per-channel": (0.6, 6.0)}))
    quantize_run(exported_run, config)
    manifest = artifacts.read_manifest(exported_run)
    extra = manifest["artifacts"]["int8-per-channel"]
    assert manifest["artifacts"]["int8"]["quantization"]["recipe"] == "default"
    assert extra["quantization"]["recipe"] == "per-channel" and extra["quantization"]["shipped_for"] == ["batch 1"]
    assert extra["sha256"] == artifacts.sha256_file(exported_run / extra["file"]) and extra["test_accuracy"] is not None
    assert [(d["batch"], d["artifact"]) for d in manifest["deployments"]] == [(1, "int8-per-channel"), (32, "int8")]
    assert deployments.follow(manifest, 1, engines.available).artifact == "int8-per-channel"
    assert deployments.follow(manifest, 64, engines.available).artifact == "int8"
    assert sorted(p.name for p in exported_run.glob("model.int8*.onnx")) == ["model.int8-per-channel.onnx", "model.int8.onnx"]
    from pipeline.pack import default_variants

    assert default_variants(manifest, exported_run) == ("int8", "int8-per-channel")

    # Quantized again where the shipped recipe wins everywhere: the per-batch file, its record and deployment go.
    monkeypatch.setattr(quantize, "speed_check", fake_speed_check(
        {"fp32": (1.0, 10.0), "default": (0.6, 4.0), "per-channel": (0.8, 6.0)}))
    quantize_run(exported_run, config)
    manifest = artifacts.read_manifest(exported_run)
    assert set(manifest["artifacts"]) == {"fp32", "int8"}
    assert [(d["batch"], d["artifact"]) for d in manifest["deployments"]] == [(1, "int8"), (32, "int8")]
    assert sorted(p.name for p in exported_run.glob("model.int8*.onnx")) == ["model.int8.onnx"]


@pytest.mark.slow
def test_the_file_fastest_on_onnxruntime_ships_as_the_fallback_of_an_openvino_deployment(exported_run, monkeypatch):
    from pipeline import artifacts, deployments
    from pipeline.pack import default_variants
    from pipeline.workflow import quantize_run

    # "default" on OpenVINO wins both batch sizes; on ONNX Runtime alone "per-channel" is 1.5x faster at batch 32.
    config = QuantizeConfig(speed_batch=32, recipes=("default", "per-channel"), engines=("onnxruntime",))
    monkeypatch.setattr(quantize, "speed_check", fake_speed_check(
        {"fp32": (1.0, 10.0), "default": (0.8, 6.0), "per-channel": (0.8, 4.0)},
        {"default@openvino": (0.5, 2.0), "per-channel@openvino": (0.6, 3.0)}))
    quantize_run(exported_run, config)
    manifest = artifacts.read_manifest(exported_run)
    assert manifest["artifacts"]["int8-per-channel"]["quantization"]["shipped_for"] == ["batch 32 on onnxruntime"]
    assert [(d["batch"], d["artifact"], d["engine"], d.get("onnxruntime_artifact")) for d in manifest["deployments"]] == [
        (1, "int8", "openvino", "int8"), (32, "int8", "openvino", "int8-per-channel")]
    without_openvino = deployments.follow(manifest, 32, lambda engine: (False, f"{engine} is not installed"))
    assert without_openvino.artifact == "int8-per-channel" and "not installed" in without_openvino.note
    assert default_variants(manifest, exported_run) == ("int8", "int8-per-channel")


def test_the_speed_check_times_the_fastest_again_in_a_final_and_keeps_one_fp32_baseline(monkeypatch):
    """Structural: the harness is replaced by a table of latencies (ms) for the first call and for the final."""
    import numpy as np

    from pipeline.timing import Slot

    first = {"fp32": 100, "a": 50, "b": 60, "c": 70, "d": 80}
    final = {"fp32": 200, "a": 150, "b": 100, "c": 180}
    names, calls = {}, []

    def session_slot(session, inputs):
        slot = Slot(run=lambda: None)
        names[id(slot.run)] = session
        return slot

    def timed(slots, plan):
        table = first if len(calls) % 2 == 0 else final  # per batch size: the first call, then the final
        calls.append(sorted(names[id(s.run)] for s in slots))
        for s in slots:
            s.latencies_ns, s.rounds = [table[names[id(s.run)]] * 1_000_000] * 3, [0, 1, 2]

    monkeypatch.setattr(quantize.runtime, "create_session", lambda path, settings, threads=None: path.name)
    monkeypatch.setattr(quantize.runtime, "session_slot", session_slot)
    monkeypatch.setattr(quantize, "time_interleaved", timed)
    models = {name: (Path(name), {}) for name in first}
    entry = quantize.speed_check(models, np.zeros((4, 1, 2, 2), np.float32), QuantizeConfig(speed_batch=2))["batch_1"]
    assert calls[:2] == [sorted(first), ["a", "b", "c", "fp32"]] and entry["finalists"] == ["a", "b", "c"]
    # The finalists' numbers come from the final (b now ranks first); d keeps its first ratio on the final's fp32.
    assert entry["fp32_ms"] == 200 and (entry["a_ms"], entry["b_ms"], entry["c_ms"]) == (150, 100, 180)
    assert entry["d_ms"] == 160 and entry["d_ratio"] == 0.8 and entry["b_ratio"] == 0.5


def test_the_shipped_int8_is_a_file_some_batch_size_runs():
    # float-gemm-outputs has the best geometric mean (0.66 x 0.70) but is fastest at no batch size: shipping it
    # would add a third file that no deployment runs. first-conv-fp32 wins batch 1, default wins batch 256.
    cands = [candidate("default"), candidate("float-gemm-outputs"), candidate("first-conv-fp32")]
    table = speed(**{"default": (0.80, 6.0), "float-gemm-outputs": (0.66, 7.0), "first-conv-fp32": (0.60, 8.2)})
    shipped, _ = quantize.choose_candidate(cands, table, 0.05)
    assert shipped.recipe in ("default", "first-conv-fp32")
    extra = quantize.per_batch_files(cands, table, shipped)
    assert len(extra) == 1 and {shipped.recipe, *extra} == {"default", "first-conv-fp32"}


def test_speed_rounds_reach_the_config_and_nonsense_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.commands.quantize import configs

    assert configs(speed_rounds=40)[0].speed_rounds == 40 and configs()[0].speed_rounds == QuantizeConfig().speed_rounds
    result = CliRunner().invoke(app, ["quantize", str(tmp_path / "run"), "--speed-rounds", "0"])
    assert result.exit_code == 2 and "speed rounds must be >= 1" in result.output
    assert "Traceback" not in result.output


def test_the_fastest_candidate_on_onnxruntime_alone_ships_too_for_devices_without_the_other_engine():
    # On OpenVINO "nhwc" wins both batch sizes; on ONNX Runtime "s2d" is 25% faster than "nhwc" at batch 256.
    cands = [candidate("nhwc-signed-input"), candidate("space-to-depth")]
    table = speed(**{"nhwc-signed-input": (0.5, 8.0), "space-to-depth": (0.5, 6.0)})
    table["batch_1"].update({"nhwc-signed-input@openvino_ms": 0.3, "space-to-depth@openvino_ms": 0.35})
    table["batch_256"].update({"nhwc-signed-input@openvino_ms": 2.0, "space-to-depth@openvino_ms": 2.4})
    shipped, _ = quantize.choose_candidate(cands, table, 0.05)
    assert shipped.recipe == "nhwc-signed-input"
    assert quantize.per_batch_files(cands, table, shipped) == {"space-to-depth": ["batch_256@onnxruntime"]}
    # Negative controls: within the margin on ONNX Runtime, or slower there than fp32 (10 ms), nothing more ships.
    table["batch_256"]["space-to-depth_ms"] = 7.9
    assert quantize.per_batch_files(cands, table, shipped) == {}
    table["batch_256"].update({"nhwc-signed-input_ms": 14.0, "space-to-depth_ms": 11.0})
    assert quantize.per_batch_files(cands, table, shipped) == {}
