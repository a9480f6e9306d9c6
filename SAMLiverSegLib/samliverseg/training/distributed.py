"""DistributedDataParallel plumbing shared by the trainers (``torchrun`` sets the environment).

``torchrun --nproc_per_node N -m samliverseg train --config C.yaml`` (or the ``samliverseg``
script) starts N processes with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. :func:`setup` joins the process group (``nccl`` when every rank has a CUDA
device, ``gloo`` otherwise, e.g. 2 CPU processes in the tests) and gives each rank its device
(``cuda:LOCAL_RANK`` on GPUs). Without ``WORLD_SIZE`` > 1 everything here is a no-op, so a
trainer is written once and runs single-process or distributed unchanged.

What the trainers do with it:

* wrap the trainable module in :func:`wrap_ddp` (gradients are averaged across ranks);
* give each rank its own share of a batch order with :func:`shard` (the order itself is drawn
  from the same seed on every rank, so the shares are disjoint and together cover the order);
* average metrics with :func:`mean_across_ranks`;
* write checkpoints and progress on rank 0 only (``is_main``), then :func:`barrier`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from samliverseg.core.devices import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank / world size from the environment (torchrun), without joining a group."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return DistInfo(rank=int(os.environ.get("RANK", "0") or 0), world_size=world,
                    local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0))


def current() -> DistInfo:
    """The live process group's rank and size (single-process when none was set up)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0),
                        dist.get_backend())
    return DistInfo()


def rank_device(device: str = "auto", info: Optional[DistInfo] = None) -> torch.device:
    """THE device choice of a rank: ``resolve_device(device)``; under DDP on CUDA rank r uses
    ``cuda:LOCAL_RANK`` (modulo the visible devices), whatever index ``device`` names."""
    info = info or env_info()
    dev = resolve_device(device)
    if info.enabled and dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank % max(1, torch.cuda.device_count()))
    return dev


def setup(device: str = "auto") -> tuple:
    """Join the process group when launched by torchrun; return ``(DistInfo, torch.device)``."""
    info = env_info()
    dev = rank_device(device, info)
    if not info.enabled:
        return info, dev
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # On GPUs, NCCL for the CUDA tensors (gradients) and gloo for the small CPU tensors the trainers
    # all-reduce (metrics, the cancel vote).
    backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(info.rank, info.world_size, info.local_rank, backend), dev


def cleanup(agreed: bool = False, timeout_s: float = 60.0) -> None:
    """Leave the process group.

    ``agreed``: every rank reaches this point at the same step (the run ended, or the cancel vote
    stopped it), so the ranks first meet at a barrier and no rank tears its connections down while
    a peer still talks to it. gloo's ``monitored_barrier`` fails at once on a peer whose
    connection closed and after ``timeout_s`` on one that hangs; the group is destroyed anyway.
    Other backends use the plain barrier (NCCL: a hung peer holds it until the group's timeout). After an
    error on one rank only (``agreed=False``) there is no barrier: the peers may never arrive.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if agreed:
        try:
            if "gloo" in str(dist.get_backend()):
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
            else:
                dist.barrier()
        except RuntimeError:
            pass  # a peer is gone: nothing left to wait for
    dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap_ddp(module: torch.nn.Module, device: torch.device, **ddp_kwargs: Any) -> torch.nn.Module:
    """``DistributedDataParallel(module, **ddp_kwargs)`` when distributed, else the module itself
    (``find_unused_parameters=True`` for a module some of whose parameters get no gradient)."""
    if not (dist.is_available() and dist.is_initialized()):
        return module
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, **ddp_kwargs)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def shard(items: Sequence[T], info: Optional[DistInfo] = None) -> Sequence[T]:
    """Rank r's share ``items[r::world]`` (all of them when not distributed)."""
    info = info or current()
    return items[info.rank::info.world_size] if info.enabled else items


def mean_across_ranks(value: float, weight: float = 1.0) -> float:
    """The weighted mean of ``value`` over the ranks (``value`` itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.tensor([float(value) * float(weight), float(weight)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def sum_across_ranks(values: Sequence[float]) -> list:
    """Element-wise sums of ``values`` over the ranks (``values`` itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """THE cancel vote: True on every rank when ``flag`` is true on any rank (a collective: every
    rank calls it at the same point; ``flag`` itself when not distributed)."""
    return sum_across_ranks([1.0 if flag else 0.0])[0] > 0


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (in place)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)
