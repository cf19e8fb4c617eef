"""Several training processes (``torchrun``, DistributedDataParallel): which rank this is, and
the collectives the ranks take together.

gloo on CPU, nccl on CUDA; only rank 0 logs and saves. Every decision that gates a collective
is taken together: a non-finite loss before ``backward`` (one all-reduce of a per-rank table),
validation scores (each rank fills its own rows, one all-reduce) and the stop flags (a broadcast
from rank 0). With one process every helper returns its input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def data_parallel(model: nn.Module, info: Dist, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when there are several ranks (gradients all-reduced)."""
    if info.world_size <= 1:
        return model
    ids = [info.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def nonfinite_loss(total: torch.Tensor, parts: dict[str, torch.Tensor], info: Dist) -> str | None:
    """What was not finite in this step's loss on any rank, or None; the same answer on every rank.

    Taken before ``backward``: under DDP a rank that skipped backward (or raised) while the
    others ran it would leave them waiting in the gradient all-reduce. One all-reduce (SUM) of a
    table with a row per rank, each rank filling its own, shows every rank all the losses.
    """
    row = torch.stack([total.detach().float(), *(v.detach().float().to(total.device) for v in parts.values())])
    table = row.unsqueeze(0)
    if info.world_size > 1:
        table = torch.zeros(info.world_size, row.numel(), device=row.device)
        table[info.rank] = row          # x + 0 is exact: the sum copies each rank's row unchanged
        dist.all_reduce(table)
    bad = [rank for rank, ok in enumerate(torch.isfinite(table[:, 0]).tolist()) if not ok]
    if not bad:
        return None
    names = list(parts)
    details = [", ".join(f"{name}={float(value):.4g}" for name, value in zip(names, table[rank, 1:].tolist()))
               for rank in bad]
    if info.world_size == 1:
        return details[0]
    return "; ".join(f"rank {rank} of {info.world_size}: {d}" for rank, d in zip(bad, details))


def gather_rows(scores: torch.Tensor, info: Dist, device: torch.device) -> torch.Tensor:
    """``scores`` (CPU) with every rank's rows: each row is filled by one rank and zero elsewhere,
    so the sum is exact."""
    if info.world_size <= 1:
        return scores
    scores = scores.to(device)
    dist.all_reduce(scores)
    return scores.cpu()


def broadcast_flag(flag: bool, info: Dist, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank."""
    if info.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device if device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())
