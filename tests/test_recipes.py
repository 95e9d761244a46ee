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
    config = quantize.recipe_config(QuantizeConfig(per_channel=True, keep_first_conv_fp32=True), "ort-defaults")
    assert (config.format, config.activation_type, config.weight_type, config.per_channel) == ("qdq", "int8", "int8", False)
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
    for row in rows.values():
        assert row["passed"] and 0 <= row["validation_accuracy"] <= 1 and 0 <= row["agreement"] <= 1
        assert set(row["latency"]) == {"batch_1", "batch_32"}
        assert all({"ms", "ratio_to_fp32", "ratio_to_ort_defaults"} <= set(v) for v in row["latency"].values())
    # The shipped file is the chosen candidate's: its quantization metadata names that recipe's activation type.
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(exported_run / "model.int8.onnx")).metadata_props}
    activation = "int8" if recipe["recipe"] == "ort-defaults" else "uint8"
    assert f"a={activation} " in meta["pipeline.quantization"] and recipe["activation_type"] == activation
    other = next(name for name in rows if name != recipe["recipe"])
    leftovers = sorted(p.name for p in exported_run.glob("model.int8.*.onnx"))
    assert leftovers == ([f"model.int8.{other}.onnx"] if keep else [])
    assert ("file" in rows[other]) is keep and set(manifest["artifacts"]) == {"fp32", "int8"}
    # One deployment per measured batch size, in exactly the documented shape.
    assert [d["batch"] for d in manifest["deployments"]] == [1, 32]
    for d in manifest["deployments"]:
        assert list(d) == ["batch", "artifact", "engine", "provider", "threads", "p50_ms", "ratio_to_fp32", "host",
                           "measured", "created"]
        assert d["artifact"] in ("fp32", "int8") and d["engine"] == "onnxruntime" and d["measured"] == "export speed check"
        assert d["threads"] >= 1 and set(d["host"]) == {"machine", "processor", "cpu_count"}
