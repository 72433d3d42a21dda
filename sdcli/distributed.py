"""Running as one of several processes started by torchrun (`torchrun --nproc-per-node N sdcli ...`).

Outside torchrun everything here is a no-op: world() is (0, 1, 0). torch is imported only inside the
functions that need it, so that importing this module costs nothing at start-up.
"""

from __future__ import annotations

import os
import typing

from sdcli.errors import SdcliError

if typing.TYPE_CHECKING:
    import torch

T = typing.TypeVar("T")


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's RANK, WORLD_SIZE and LOCAL_RANK; (0, 1, 0) outside it."""
    values = []
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name, "").strip()
        try:
            values.append(int(text) if text else default)
        except ValueError:
            raise SdcliError(f"environment variable {name}={text!r} is not a whole number (torchrun sets it)") \
                from None
    rank, size, local = values
    if size < 1 or not 0 <= rank < size or local < 0:
        raise SdcliError(f"RANK={rank} WORLD_SIZE={size} LOCAL_RANK={local} are inconsistent (torchrun sets them)")
    return rank, size, local


def is_main() -> bool:
    """True in the process that speaks for the run (rank 0), and outside torchrun."""
    return world()[0] == 0


def initialized() -> bool:
    """Whether a torch.distributed process group exists in this process (without importing torch needlessly)."""
    import sys

    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init(device_type: str) -> None:
    """Join the other processes (a no-op outside torchrun): NCCL on CUDA, with this process on cuda:LOCAL_RANK,
    gloo elsewhere. Call it in every rank: it waits until all of them have."""
    _, size, local = world()
    if size <= 1:
        return
    import torch
    import torch.distributed as dist

    if device_type == "cuda":
        if local >= torch.cuda.device_count():
            raise SdcliError(f"LOCAL_RANK {local} has no GPU: this machine has {torch.cuda.device_count()} CUDA "
                             "device(s); start at most that many processes per node")
        torch.cuda.set_device(local)
    if not dist.is_available():
        raise SdcliError("this torch build has no torch.distributed: run without torchrun")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")


def device_for_rank(device: torch.device) -> torch.device:
    """Under torchrun each process of a node takes its own GPU: cuda -> cuda:LOCAL_RANK; others unchanged."""
    _, size, local = world()
    if size > 1 and device.type == "cuda":
        import torch

        return torch.device("cuda", local)
    return device


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if not initialized():
        return
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's `obj` (any picklable object) in every rank; `obj` itself without a process group."""
    if not initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order; [obj] without a process group."""
    if not initialized():
        return [obj]
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def shard(items: list[T], rank: int, world: int) -> list[T]:
    """The items rank `rank` of `world` takes: every world-th one, from its rank on (round robin, so that work
    that grows or shrinks along the list is spread evenly). Each item goes to exactly one rank, and the order is
    kept. Pass whole units of work (e.g. batches of images, not images) to keep them together."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world {world}")
    return list(items[rank::world])


def cleanup() -> None:
    """Leave the process group, if there is one."""
    if initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
