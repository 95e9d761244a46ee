"""Data-parallel training across processes and machines, on PyTorch's own engine.

`torchrun --nproc_per_node N -m pipeline train ...` starts N copies of the program with
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; `session()` joins them into a
process group (gloo for CPU tensors, NCCL for CUDA tensors) and `train.train` wraps the model
in `DistributedDataParallel`. Without those variables everything here is a no-op and a single
process trains exactly as it always did.

The contract between the ranks:
- every rank loads the same data (`check_same_data` compares fingerprints) and draws the same per-epoch permutation from the shared
  shuffle generator; `shard` gives each rank its strided share of it, exactly as
  `DistributedSampler` (pad to a multiple of the world size, then take every N-th index), so
  together the ranks see every image once per epoch, reshuffled every epoch;
- losses and correct counts are summed across ranks (`all_reduce_sum`), so every rank holds
  the same validation loss and takes the same early-stopping decision;
- only rank 0 touches the run folder (`on_main`), and its failures are raised on every rank
  instead of leaving the others waiting in a collective;
- at the end, `check_replicas` proves every rank holds the same weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import DeviceError, PipelineError

log = logging.getLogger(__name__)
T = TypeVar("T")
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(PipelineError):
    """A distributed launch that is misconfigured, or ranks that disagree."""

    exit_code = 17


@dataclass(frozen=True)
class World:
    """Where this process stands among the processes training one model."""

    rank: int = 0
    """Global rank, 0 .. world_size - 1; rank 0 writes the run folder."""
    world_size: int = 1
    """Number of processes across all machines."""
    local_rank: int = 0
    """Rank on this machine; picks the GPU."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(environ: dict | None = None) -> World:
    """The world torchrun describes in the environment; a single process when it describes none."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return World()
    try:
        values = {name: int(environ.get(name, "0")) for name in ENV_VARS}
    except ValueError:
        shown = ", ".join(f"{name}={environ.get(name)!r}" for name in ENV_VARS)
        raise DistributedError(f"torchrun variables must be integers, got {shown}") from None
    world = World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if world.world_size < 1 or not 0 <= world.rank < world.world_size or world.local_rank < 0:
        raise DistributedError(f"inconsistent torchrun variables: RANK={world.rank}, WORLD_SIZE={world.world_size}, "
                               f"LOCAL_RANK={world.local_rank}")
    return world


def current() -> World:
    """This process's world: the initialized process group's, else a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), from_env().local_rank)


def backend() -> str:
    """gloo for CPU tensors, and NCCL for CUDA tensors where CUDA exists.

    One group serves both: DDP on GPUs reduces gradients over NCCL while the small metric
    and object collectives here stay on CPU tensors over gloo.
    """
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def session() -> Iterator[World]:
    """Join torchrun's process group for the duration of the block, and always leave it.

    Re-entrant: inside an open session (or without torchrun) it only yields the world.
    """
    world = from_env()
    if not world.distributed or (dist.is_available() and dist.is_initialized()):
        yield current() if world.distributed else world
        return
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed support")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world.world_size} but {', '.join(missing)} not set: start with torchrun")
    if torch.cuda.is_available() and world.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend=backend())
    log.info("rank %d of %d joined the process group (%s)", world.rank, world.world_size, dist.get_backend())
    try:
        yield world
        # Leave together: seen once under heavy load, rank 1 aborted ("terminate called without an
        # active exception") while tearing down as rank 0 was still busy writing the run folder.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def local_device(device: torch.device, world: World) -> torch.device:
    """Each rank on a machine takes its own GPU: cuda -> cuda:LOCAL_RANK."""
    if device.type != "cuda" or not world.distributed:
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise DeviceError(f"LOCAL_RANK {world.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                          f"start at most that many processes per node")
    return torch.device("cuda", world.local_rank)


def wrap(model: nn.Module, device: torch.device, world: World) -> nn.Module:
    """`DistributedDataParallel` around the model across ranks; the model itself alone."""
    if not world.distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def local_batch(batch_size: int, world: World) -> int:
    """Images per rank per step, so that one step still covers about `batch_size` images."""
    return -(-batch_size // world.world_size)


def shard(order: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's share of an epoch's permutation, as `DistributedSampler` (drop_last=False) takes it.

    The permutation is padded with its own first indices to a multiple of the world size and
    every N-th index goes to a rank. Consecutive local batches of b images then form, across
    ranks, consecutive blocks of N * b images of the permutation: with N * b equal to the
    single-process batch size every step sees the images a single process would.
    """
    if not world.distributed:
        return order
    total = -(-len(order) // world.world_size) * world.world_size
    if total > len(order):
        repeats = -(-total // len(order))
        order = torch.cat([order] * repeats)[:total] if repeats > 1 else torch.cat([order, order[:total - len(order)]])
    return order[world.rank:total:world.world_size]


def seed_for_epoch(seed: int, epoch: int, world: World) -> int:
    """A dropout-mask seed per (seed, epoch, rank): ranks draw different masks, a resumed run the same ones."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{world.rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def all_reduce_sum(values: Sequence[float], world: World) -> tuple[float, ...]:
    """Sums across ranks, identical on every rank; the values themselves for a single process."""
    if not world.distributed:
        return tuple(values)
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    # Rank 0's sums, bit for bit, on every rank: early stopping must not split the ranks.
    dist.broadcast(tensor, src=0)
    return tuple(tensor.tolist())


def broadcast_buffers(model: nn.Module, world: World) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP copies them from rank 0 at the start of each forward, so after the last step of an
    epoch each rank holds its own update; evaluation and checkpoints need one set.
    """
    if not world.distributed:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def on_main(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run `fn` on rank 0 only; every rank returns its result or raises its error.

    Used for everything that touches the run folder: the other ranks wait here instead of
    racing rank 0, and a refusal on rank 0 (say, the folder exists) stops them all.
    """
    world = current()
    if not world.distributed:
        return fn(*args, **kwargs)
    outcome: list = [None]
    error: BaseException | None = None
    if world.is_main:
        try:
            outcome[0] = (True, fn(*args, **kwargs))
        except Exception as exc:  # re-raised below, on every rank
            error = exc
            outcome[0] = (False, _portable(exc))
    dist.broadcast_object_list(outcome, src=0)
    ok, value = outcome[0]
    if ok:
        return value
    raise error if error is not None else value


def _portable(exc: Exception) -> Exception:
    """The exception itself when it survives pickling, else a DistributedError that names it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return DistributedError(f"rank 0 failed: {type(exc).__name__}: {exc}")


def parameter_digest(model: nn.Module) -> str:
    """sha256 of the model's state (names, dtypes, shapes and bytes), as saved in a checkpoint."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas(model: nn.Module, world: World) -> tuple[str, ...]:
    """Every rank's `parameter_digest`; `DistributedError` when the replicas have diverged."""
    return _agree(parameter_digest(model), "model replicas diverged", "weights", world)


def check_same_data(fingerprint: str, world: World) -> None:
    """`DistributedError` unless every rank loaded the same data (each machine reads its own copy)."""
    _agree(fingerprint, "the ranks loaded different data", "a data fingerprint", world)


def _agree(mine: str, problem: str, what: str, world: World) -> tuple[str, ...]:
    """Every rank's value of `mine`, raising on every rank when any differs from rank 0's."""
    if not world.distributed:
        return (mine,)
    values: list = [None] * world.world_size
    dist.all_gather_object(values, mine)
    differing = [rank for rank, value in enumerate(values) if value != values[0]]
    if differing:
        raise DistributedError(f"{problem}: ranks {differing} hold {what} other than rank 0's "
                               f"({values[0][:12]} vs {', '.join(values[r][:12] for r in differing)})")
    return tuple(values)
