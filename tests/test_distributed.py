"""Distributed data-parallel training (issue 11): sharding, reductions, rank-0-only writes,
identical replicas, and a real `torchrun --nproc_per_node 2 -m pipeline train` whose
checkpoint exports like any other.

Two CPU processes talk over gloo on localhost; nothing needs a GPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from pipeline import distributed
from pipeline.distributed import DistributedError, World

# Equivalence config: 640 training images, divisible by 2 ranks and by the batch of 64, no dropout:
# a 2-rank step must see exactly the images of a single-process step.
EQUIVALENCE_DATA = {"max_train_samples": 640}
EQUIVALENCE_MODEL = {"conv_channels": (8, 16), "fc_units": (32,), "dropout": 0.0}
EQUIVALENCE_TRAIN = {"epochs": 2, "batch_size": 64, "lr": 3e-3, "patience": 0, "seed": 0, "threads": 1}


# --- single-process pieces --------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 3, 10, 11, 13])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_shard_takes_what_distributed_sampler_takes(size, world_size):
    permutation = torch.randperm(size, generator=torch.Generator().manual_seed(size))
    for rank in range(world_size):
        sampler = DistributedSampler(range(size), num_replicas=world_size, rank=rank, shuffle=False)
        expected = permutation[list(sampler)]
        assert torch.equal(distributed.shard(permutation, World(rank, world_size)), expected)


def test_local_batches_across_ranks_form_the_single_process_batches():
    world_size, batch = 2, 64
    order = torch.randperm(640, generator=torch.Generator().manual_seed(0))
    local = distributed.local_batch(batch, World(0, world_size))
    shards = [distributed.shard(order, World(rank, world_size)) for rank in range(world_size)]
    for step, start in enumerate(range(0, 640, local)):
        together = torch.cat([shard[start:start + local] for shard in shards])
        assert sorted(together.tolist()) == sorted(order[step * batch:(step + 1) * batch].tolist())


def test_a_single_process_is_untouched(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    single = distributed.from_env()
    assert single == World() and single.is_main and not single.distributed
    order = torch.arange(7)
    assert distributed.shard(order, single) is order
    assert distributed.all_reduce_sum((1.5, 3), single) == (1.5, 3)
    assert distributed.local_batch(64, single) == 64
    with distributed.session() as world:
        assert world == World()
        assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("env", [{"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
                                 {"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0"},
                                 {"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}])
def test_inconsistent_torchrun_variables_are_refused(env):
    with pytest.raises(DistributedError, match="torchrun variables"):
        distributed.from_env(env)


def test_from_env_reads_torchrun_variables():
    assert distributed.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(3, 4, 1)


def test_dropout_seeds_differ_by_rank_and_epoch_and_repeat():
    seeds = {distributed.seed_for_epoch(0, epoch, World(rank, 2)) for epoch in (1, 2) for rank in (0, 1)}
    assert len(seeds) == 4
    assert distributed.seed_for_epoch(0, 1, World(1, 2)) == distributed.seed_for_epoch(0, 1, World(1, 2))


def test_parameter_digest_sees_one_changed_weight():
    model = torch.nn.Linear(3, 2)
    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    assert distributed.parameter_digest(model) == distributed.parameter_digest(twin)
    with torch.no_grad():
        twin.bias[0] += 1e-6
    assert distributed.parameter_digest(model) != distributed.parameter_digest(twin)


# --- two gloo processes calling the library ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank: collectives, error propagation, replica check, then a short training run."""
    from pipeline import data, train
    from pipeline.config import DataConfig, ModelConfig, TrainConfig
    from pipeline.errors import RunFolderError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    report: dict = {}
    with distributed.session() as world:
        report["sums"] = distributed.all_reduce_sum((rank + 1, 0.5), world)

        def refuse():
            raise RunFolderError("models/x already exists")
        try:
            distributed.on_main(refuse)
        except RunFolderError as exc:
            report["on_main_error"] = str(exc)
        report["on_main_value"] = distributed.on_main(lambda: f"from rank {distributed.current().rank}")

        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        report["same"] = list(distributed.check_replicas(model, world))
        if rank == 1:
            with torch.no_grad():
                model.weight[0, 0] += 1e-3
        try:
            distributed.check_replicas(model, world)
        except DistributedError as exc:
            report["diverged_error"] = str(exc)

        distributed.check_same_data("same fingerprint", world)
        try:
            distributed.check_same_data(f"fingerprint of rank {rank}", world)
        except DistributedError as exc:
            report["data_error"] = str(exc)

        splits = data.load(DataConfig(**EQUIVALENCE_DATA))
        model_config = train.model_config_for(splits, ModelConfig(**EQUIVALENCE_MODEL))
        run_dir = Path(out) / f"rank{rank}"  # each rank gets a folder; only rank 0 may write in its own
        run_dir.mkdir()
        result = train.train(splits, DataConfig(**EQUIVALENCE_DATA), model_config,
                             TrainConfig(**EQUIVALENCE_TRAIN), run_dir)
        report["world_size"] = result.world_size
        report["digests"] = list(result.replica_digests)
        report["history"] = [h.to_dict() for h in result.history]
        report["test_accuracy"] = result.test_accuracy
        report["written"] = sorted(p.name for p in run_dir.iterdir())
    (Path(out) / f"report{rank}.json").write_text(json.dumps(report))


def _single_process_checkpoint(out: Path, **train_overrides) -> tuple[dict, object]:
    from pipeline import data, train
    from pipeline.config import DataConfig, ModelConfig, TrainConfig

    splits = data.load(DataConfig(**EQUIVALENCE_DATA))
    model_config = train.model_config_for(splits, ModelConfig(**EQUIVALENCE_MODEL))
    out.mkdir()
    result = train.train(splits, DataConfig(**EQUIVALENCE_DATA), model_config,
                         TrainConfig(**{**EQUIVALENCE_TRAIN, **train_overrides}), out)
    return torch.load(result.checkpoint, weights_only=True)["state_dict"], result


def _max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow
def test_two_gloo_ranks_agree_and_match_single_process_training(tmp_path):
    import torch.multiprocessing as mp

    from pipeline import artifacts

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"report{rank}.json").read_text()) for rank in (0, 1)]

    # Reductions and rank-0 decisions are the same on every rank.
    assert [r["sums"] for r in reports] == [[3.0, 1.0], [3.0, 1.0]]
    assert [r["on_main_error"] for r in reports] == ["models/x already exists"] * 2
    assert [r["on_main_value"] for r in reports] == ["from rank 0"] * 2
    assert reports[0]["same"] == reports[1]["same"] and len(set(reports[0]["same"])) == 1
    # Negative control: one weight moved on rank 1 is caught on both ranks.
    assert all("replicas diverged: ranks [1]" in r["diverged_error"] for r in reports)
    assert all("different data: ranks [1]" in r["data_error"] for r in reports)

    # Training: identical replicas, identical (all-reduced) metrics, one writer.
    assert [r["world_size"] for r in reports] == [2, 2]
    assert reports[0]["digests"] == reports[1]["digests"] and len(set(reports[0]["digests"])) == 1
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in reports[0]["history"]] == \
           [{k: v for k, v in h.items() if k != "seconds"} for h in reports[1]["history"]]
    assert reports[0]["written"] == sorted([artifacts.CHECKPOINT, artifacts.TRAIN_STATE])
    assert reports[1]["written"] == []

    ddp_state = torch.load(tmp_path / "rank0" / artifacts.CHECKPOINT, weights_only=True)["state_dict"]
    from pipeline.train import load_checkpoint
    assert distributed.parameter_digest(load_checkpoint(tmp_path / "rank0" / artifacts.CHECKPOINT)[0]) == \
        reports[0]["digests"][0]

    # Same data, seed and global batch: the 2-rank run is the single-process run up to float rounding...
    single_state, single = _single_process_checkpoint(tmp_path / "single")
    close = _max_abs_diff(ddp_state, single_state)
    # ...while a different batch split (what a per-rank batch of 64 would mean) is far off.
    other_state, _ = _single_process_checkpoint(tmp_path / "batch128", batch_size=128)
    far = _max_abs_diff(ddp_state, other_state)
    assert close < 1e-4 < far / 10, (close, far)
    assert abs(single.test_accuracy - reports[0]["test_accuracy"]) <= 1 / 360 + 1e-9


# --- torchrun, the way a user starts it ---------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_processes_write_one_run_that_exports(tmp_path):
    from pipeline import artifacts
    from pipeline.config import ExportConfig
    from pipeline.train import load_checkpoint
    from pipeline.workflow import export_run

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pipeline", "train", "--quiet", "--epochs", "4", "--conv-channels", "8,16", "--fc-units", "32",
               "--dropout", "0.5", "--lr", "3e-3", "--patience", "0", "--out", "runs/ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Only rank 0 reports and writes: one result line, one run folder, nothing else in the cwd.
    assert done.stdout.count("test accuracy") == 1, done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]
    run = tmp_path / "runs" / "ddp"

    metrics = json.loads((run / artifacts.METRICS).read_text())
    manifest = artifacts.read_manifest(run)
    assert metrics["world_size"] == 2 and manifest["training"]["world_size"] == 2
    model, _ = load_checkpoint(run / artifacts.CHECKPOINT)
    digest = distributed.parameter_digest(model)
    assert metrics["replica_sha256"] == [digest, digest]
    assert manifest["training"]["checkpoint_sha256"] == artifacts.sha256_file(run / artifacts.CHECKPOINT)
    assert metrics["test_accuracy"] > 0.5

    # The checkpoint goes through the same export, audit and parity checks as a single-process one.
    exported = export_run(run, ExportConfig())
    record = artifacts.read_manifest(run)["artifacts"]["fp32"]
    assert exported.model_path == run / "model.onnx" and record["sha256"] == artifacts.sha256_file(run / "model.onnx")
    assert not any("Dropout" in op or "Random" in op for op in exported.export["op_histogram"]["shipped"])
    assert abs(record["test_accuracy"] - metrics["test_accuracy"]) <= 1 / 360 + 1e-9
