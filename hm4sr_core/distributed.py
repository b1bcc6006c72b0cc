"""Data-parallel training over several processes (torch.distributed, DDP).

What lives here: the process group's setup and teardown (``gloo`` on the CPU, ``nccl``
on CUDA, read from the environment variables ``torchrun`` sets), the shard of a global
batch each rank trains on, the gathering of evaluation rows, and :func:`spawn`, the
launcher behind ``hm4sr train --nproc N``. :func:`hm4sr_core.train.train` trains
data-parallel whenever it runs inside an initialised process group.

The contract (docs/guide.md, "Distributed training"):

- every rank draws the same global batch order and trains on rows ``rank::world`` of
  each global batch (strided: bucketed batches are sorted by length, so each rank gets
  the same mix of lengths);
- each rank's loss is scaled by ``examples * world / global examples`` and DDP averages
  the gradients over ranks, so the next-item gradient is the full batch's; in-batch
  negatives of the contrastive losses stay within a rank's shard (not gathered);
- evaluation ranks every ``world``-th evaluation batch on each rank, the same batches as
  one process, and gathers the rows back into one process's order (equal to the bit).
"""

from __future__ import annotations

import ctypes
import inspect
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import runtime
from .data.splits import SequenceBatch

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 300.0  # a rank waits this long for the others in a collective before failing


class DistributedError(RuntimeError):
    """A rank of a :func:`spawn` run failed; the message names every rank that did and why."""


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank ``rank`` of ``world`` (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # index of this rank's GPU on its machine (torchrun's LOCAL_RANK)
    active: bool = False  # True inside an initialised process group (even one of a single process)

    @property
    def main(self) -> bool:
        """The rank that writes files and prints."""
        return self.rank == 0


SINGLE = Ranks()


def current() -> Ranks:
    """This process's :class:`Ranks`: from the process group when one is initialised, else :data:`SINGLE`."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    rank = dist.get_rank()
    return Ranks(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)), True)


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def backend() -> str:
    """The initialised process group's backend ("gloo", "nccl")."""
    return str(dist.get_backend())


def setup(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """Join the process group described by the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT: what ``torchrun`` and :func:`spawn` set). On CUDA each rank
    takes GPU ``LOCAL_RANK``. A collective that waits longer than ``timeout_s`` fails
    instead of hanging (a dead peer usually fails it at once: its connection closes)."""
    missing = [k for k in ENVIRONMENT if k not in os.environ]
    if missing:
        raise ValueError(f"distributed setup: environment variable(s) {', '.join(missing)} not set "
                         f"(start the ranks with torchrun or `hm4sr train --nproc N`)")
    if timeout_s <= 0:
        raise ValueError(f"distributed timeout must be > 0 seconds, got {timeout_s}")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not 0 <= rank < world:
        raise ValueError(f"distributed setup: RANK {rank} outside [0, WORLD_SIZE={world})")
    backend = backend_for(device)
    if backend == "nccl":
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise ValueError(f"distributed setup: rank {rank} wants cuda:{local} (LOCAL_RANK), but torch sees "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPU(s)")
        torch.cuda.set_device(local)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return current()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str, ranks: Ranks) -> torch.device:
    """The device this rank trains on: ``config.device``, except that on CUDA inside a
    process group each rank takes ``cuda:LOCAL_RANK``."""
    dev = torch.device(device)
    if not ranks.active or dev.type != "cuda":
        return dev
    if dev.index is not None and dev.index != ranks.local_rank:
        raise ValueError(f"device {device!r} under distributed training: each rank uses cuda:LOCAL_RANK "
                         f"(rank {ranks.rank} has LOCAL_RANK {ranks.local_rank}); set device=cuda")
    return torch.device("cuda", ranks.local_rank)


def example_count(batch: SequenceBatch) -> int:
    """Examples the next-item loss averages over: positions with a target (dense layout)
    or sequences (prefix layout)."""
    if batch.position_targets is not None:
        return int((batch.position_targets > 0).sum())
    return batch.size


def _rows(batch: SequenceBatch, idx: torch.Tensor) -> SequenceBatch:
    """Rows ``idx`` of ``batch``, trimmed to their own longest sequence (left-aligned, so
    trimming changes no result)."""
    lengths = batch.lengths[idx]
    width = int(lengths.max())
    pt = batch.position_targets
    return SequenceBatch(batch.items[idx, :width], batch.timestamps[idx, :width], lengths, batch.targets[idx],
                         batch.users[idx], pt[idx, :width] if pt is not None else None)


@dataclass
class Shard:
    """One rank's part of a global batch."""

    batch: SequenceBatch
    examples: int  # this shard's examples (see example_count); 0 for an empty shard
    total: int  # the global batch's examples
    world: int  # ranks sharing the global batch

    @property
    def weight(self) -> float:
        """Scale of this rank's mean loss so that DDP's average over ``world`` ranks gives
        the example-weighted mean over the global batch."""
        return 0.0 if self.total == 0 else self.examples * self.world / self.total


def shard_batch(batch: SequenceBatch, ranks: Ranks) -> Shard:
    """Rows ``rank::world`` of a global batch. A rank left without rows (a global batch
    smaller than ``world``) runs the batch's first row at weight 0: it still joins the
    gradient all-reduce, and adds nothing to it."""
    idx = torch.arange(ranks.rank, batch.size, ranks.world)
    total = example_count(batch)
    if len(idx) == 0:
        return Shard(_rows(batch, torch.zeros(1, dtype=torch.int64)), 0, total, ranks.world)
    part = _rows(batch, idx)
    return Shard(part, example_count(part), total, ranks.world)


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around ``model``. Buffers (feature tables, categories) never change, so they are
    not re-broadcast each step. The placeholder encoder goes unused in a step where no
    sequence of a rank's shard is long enough for placeholders: DDP must then look for
    unused parameters (one more graph traversal per step), so only models that have one."""
    ids = [device.index] if device.type == "cuda" else None
    # torch >= 2.10 renames the switch (and still syncs buffers once at init: harmless, they are equal)
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in \
        inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers"
    unused = getattr(model, "placeholders", None) is not None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused, **{no_sync: False})


def weighted_losses(losses: dict[str, torch.Tensor], total: torch.Tensor, shard: Shard) -> tuple[dict, torch.Tensor]:
    """The global batch's losses for the history: each rank's loss weighted by its examples,
    summed over ranks, divided by the global count (the next-item loss is then the one
    process's full-batch loss up to rounding). One all-reduce of a few numbers."""
    names = list(losses)
    vec = torch.stack([v.detach().float() for v in losses.values()] + [total.detach().float()])
    vec = vec * (shard.examples / max(shard.total, 1))
    dist.all_reduce(vec)
    return dict(zip(names, vec[:-1])), vec[-1]


def gather_objects(obj: Any, ranks: Ranks) -> list:
    """``obj`` from every rank, in rank order (pickled; keep it small or on the CPU)."""
    out: list = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- launcher


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another program could take it before the ranks
    bind it; a rare failure that a rerun fixes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Linux: this process gets SIGTERM when the launcher dies (prctl PR_SET_PDEATHSIG), so
    a killed launcher leaves no rank behind."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))
        except (OSError, AttributeError):
            pass


def _bootstrap(rank: int, world: int, port: int, fn: Callable, args: tuple, device: str, timeout_s: float,
               error_file: str) -> None:
    """A :func:`spawn` rank: environment, process group, ``fn(*args)``, teardown. An exception's
    traceback goes to stderr and to ``error_file`` for the launcher's message."""
    _die_with_parent()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    try:
        setup(device, timeout_s)
        try:
            fn(*args)
        finally:
            teardown()
    except BaseException as err:  # noqa: BLE001 - reported to the launcher, then the rank exits non-zero
        text = traceback.format_exc()
        Path(error_file).write_text(text)
        print(f"rank {rank}: {text}", file=sys.stderr, flush=True)
        sys.exit(130 if isinstance(err, KeyboardInterrupt) else 1)


def _cause(process, error_file: Path) -> str:
    if error_file.exists() and error_file.read_text().strip():
        return "failed with " + error_file.read_text().strip().splitlines()[-1]
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def spawn(fn: Callable, nproc: int, args: tuple = (), *, device: str = "cpu",
          timeout_s: float = DEFAULT_TIMEOUT_S, grace_s: float = 5.0) -> None:
    """Run ``fn(*args)`` in ``nproc`` fresh processes forming one process group on this
    machine (127.0.0.1, a free port; ``gloo`` on the CPU, ``nccl`` on CUDA, rank r on
    ``cuda:r``). ``fn`` must be importable (a module-level function).

    When a rank fails or is killed, the others get ``grace_s`` seconds to end by themselves
    (their next collective fails), then SIGTERM, then SIGKILL; :class:`DistributedError`
    names each rank that did not finish and why, the first one first."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hm4sr-ranks-") as tmp:
        errors = [Path(tmp) / f"rank-{r}.err" for r in range(nproc)]
        procs = [ctx.Process(target=_bootstrap, args=(r, nproc, port, fn, args, device, timeout_s, str(errors[r])),
                             name=f"hm4sr-rank-{r}") for r in range(nproc)]
        with runtime.children_preload():  # the ranks run MKL's products on this process's code path
            for p in procs:
                p.start()
        order: list[int] = []  # ranks in the order they ended badly
        try:
            running = {p.sentinel: r for r, p in enumerate(procs)}
            while running and not order:
                for sentinel in multiprocessing.connection.wait(list(running)):
                    r = running.pop(sentinel)
                    procs[r].join()
                    if procs[r].exitcode != 0:
                        order.append(r)
            if order:
                end = time.monotonic() + grace_s
                for p in procs:
                    p.join(max(0.0, end - time.monotonic()))
        finally:
            _stop(procs)
        if not order:
            return
        order += [r for r, p in enumerate(procs) if p.exitcode != 0 and r not in order]
        lines = [f"rank {r} of {nproc} {_cause(procs[r], errors[r])}" for r in order]
        raise DistributedError("; then ".join(lines))


def _stop(procs: list, wait_s: float = 10.0) -> None:
    """SIGTERM every rank still running, SIGKILL those still there ``wait_s`` later."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + wait_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def draw_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of rank ``rank``'s placeholder draws in ``epoch`` (distinct per rank, reproducible)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
