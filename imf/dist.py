"""Distributed setup shared by the trainer and the evaluator (and a free TCP port for tests and benchmarks).

Under ``torchrun`` (``RANK`` in the environment) every process joins one group: nccl on CUDA (each
process on ``cuda:LOCAL_RANK``), gloo on CPU. Without torchrun the run is one plain process and no group
is created. The steps are split so a CLI can validate its arguments before it joins a group::

    env = describe(device)      # reads the environment, picks and checks the device; no side effects
    env = init(env)             # sets the CUDA device, creates the process group (when under torchrun)
    ...
    destroy(env)                # destroys the group if ``init`` created it

or all three at once with ``with session(device) as env:``. ``gather``, ``barrier`` and
``is_distributed`` work with and without a group (one process: a list of one, a no-op, False).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import Iterator

import torch
import torch.distributed as dist

from imf.cli import UserError


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """This process's place in the run: ``rank`` of ``world``, its ``device``, whether it is under torchrun
    (``launched``) and whether :func:`init` created the process group (``owns_group``)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    launched: bool
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mesh(self):
        """A 1-D device mesh over all ranks (for FSDP2), or None for one process."""
        if self.world == 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world,))


def describe(device: str = "auto", *, arg: str = "device") -> DistEnv:
    """The rank, world size and device from the environment; ``device`` is "auto", "cpu" or "cuda[:i]".

    Raises :class:`imf.cli.UserError` naming ``arg`` when CUDA is asked for but not available. Under
    torchrun a CUDA process uses ``cuda:LOCAL_RANK`` (an explicit index is for single-process runs).
    """
    if device != "auto" and device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"{arg} must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError(f"{arg} {device!r} requested but CUDA is not available (use {arg} cpu or auto)")
    if "RANK" not in os.environ:
        dev = torch.device(device if device.startswith("cuda") else ("cuda" if use_cuda else "cpu"))
        return DistEnv(0, 1, 0, dev, launched=False)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return DistEnv(int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1")), local, dev, launched=True)


def init(env: DistEnv) -> DistEnv:
    """Set the CUDA device and, under torchrun, create the process group unless one exists already."""
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if not env.launched or dist.is_initialized():
        return env
    cuda = env.device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", device_id=env.device if cuda else None)
    return dataclasses.replace(env, rank=dist.get_rank(), world=dist.get_world_size(), owns_group=True)


def destroy(env: DistEnv) -> None:
    """Destroy the process group if :func:`init` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str = "auto", *, arg: str = "device") -> Iterator[DistEnv]:
    """``describe`` + ``init`` on entry, ``destroy`` on exit."""
    env = init(describe(device, arg=arg))
    try:
        yield env
    finally:
        destroy(env)


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the current group, ``(0, 1)`` without one."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """``dist.barrier()`` in a group; nothing in one process."""
    if is_distributed():
        dist.barrier()


def gather(obj, dst: int = 0) -> list | None:
    """``obj`` of every rank on rank ``dst`` (rank order), None elsewhere; ``[obj]`` without a group."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (for a rendezvous in tests and benchmarks)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


__all__ = [
    "DistEnv",
    "barrier",
    "describe",
    "destroy",
    "free_port",
    "gather",
    "init",
    "is_distributed",
    "rank_world",
    "session",
]
