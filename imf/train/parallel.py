"""Apply activation checkpointing, ``torch.compile`` and FSDP2 to a MeanFlow network (torchtitan order).

``parallelize(model, *, mesh, ...)`` works per transformer block (``model.trunk``, ``model.u_blocks``,
``model.v_blocks`` for iMF; ``model.blocks`` for the MF DiT), in this order:

1. activation checkpointing: the block's forward runs under non-reentrant ``torch.utils.checkpoint``
   (the blocks take and return ``(x, x_t)`` with ``x_t`` possibly ``None``; the tangent is computed
   without grad, so only the primal activations are recomputed for backward). It works because the
   dual forward is explicit: ``torch.func.jvp`` would not compose with checkpointing;
2. ``torch.compile`` of each block (``nn.Module.compile``, in place: parameter names do not change);
3. ``fully_shard`` of each block, then of the root, with
   ``MixedPrecisionPolicy(param_dtype, reduce_dtype)``: the sharded parameters stay fp32 (master
   weights, optimizer and EMA work on them), the all-gathered ones are ``param_dtype`` during forward and
   backward, gradients are reduce-scattered in ``reduce_dtype``.

Forward inputs are not cast by FSDP (``cast_forward_inputs=False``): the trainer runs the model under
``torch.autocast`` in the same dtype, which keeps the times and guidance scales fp32 in the condition
embeddings. ``velocity`` and ``forward_with_tangent`` are registered as FSDP forward methods so the
root's parameters are gathered for them too. With ``mesh=None`` (one process) nothing is sharded.

Parameter names stay those of the plain model, so EMA, checkpoints and export see the same keys
everywhere.

``build(model_cfg, ...)`` is the trainer's construction: the model is built on the meta device and
parallelized. One process then materialises it on the CPU with ``to_empty``, runs ``init_weights()``
under the run's seed (the eager construction's weights, and the non-persistent buffers such as the RoPE
tables) and moves it to its device. Sharded, each rank allocates only its shards on its device
(``to_empty``), and rank 0 builds the same model eagerly on the CPU from the seed (``init_weights``
inside) and sends every rank its shard of each parameter (``set_model_state_dict(...,
broadcast_from_rank0=True)``, one parameter at a time) and the buffers. So the weights are the seed's
on every world size and device, and only rank 0 holds one full fp32 copy, in host memory, during
start-up. (DTensor has no distributed RNG on CPU meshes, so an ``init_weights`` on the shards would
draw the same numbers on every rank.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint

from imf.config import ModelConfig
from imf.dist import DistEnv
from imf.model import build_model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an iMF transformer or MF DiT, in execution order."""
    lists = [getattr(model, name) for name in ("trunk", "u_blocks", "v_blocks", "blocks") if hasattr(model, name)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no trunk/u_blocks/v_blocks/blocks to parallelize")
    return [blk for blocks in lists for blk in blocks]


def _checkpoint_forward(block: nn.Module) -> None:
    """Route ``block(...)`` through non-reentrant activation checkpointing (parameter names unchanged)."""
    inner = block.forward

    def forward(*args):
        return checkpoint(inner, *args, use_reentrant=False)

    block.forward = forward


def parallelize(
    model: nn.Module,
    *,
    mesh: DeviceMesh | None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    activation_checkpointing: bool = False,
    compile: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Checkpointing, then per-block compile, then per-block ``fully_shard``, then the root (in place).

    ``mesh``: 1-D data-parallel device mesh, or None for no sharding (single process). ``param_dtype``:
    dtype of the gathered parameters in forward/backward (None: their own, fp32); ``reduce_dtype``:
    gradient reduce-scatter dtype. Returns ``model``.
    """
    blocks = transformer_blocks(model)
    for blk in blocks:
        if activation_checkpointing:
            _checkpoint_forward(blk)
        if compile:
            blk.compile()
    if mesh is None:
        return model
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for blk in blocks:
        fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for method in ("velocity", "forward_with_tangent"):
        register_fsdp_forward_method(model, method)
    return model


def build(model_cfg: ModelConfig, *, backend: str, env: DistEnv, seed: int, **parallel) -> nn.Module:
    """The training model: meta -> :func:`parallelize` (``parallel`` keywords) -> ``to_empty`` -> the weights
    and buffers of ``init_weights()`` under ``seed`` (see the module docstring); collective."""
    model = build_model(model_cfg, backend=backend, device="meta")
    parallelize(model, mesh=env.mesh(), **parallel)
    torch.manual_seed(seed)
    if env.world == 1:  # nothing is sharded: initialise in place, on the CPU (the seed's weights on any device)
        model.to_empty(device="cpu")
        model.init_weights()
        return model.to(env.device)
    model.to_empty(device=env.device)
    eager = build_model(model_cfg, backend=backend, device="cpu") if env.rank == 0 else None
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, eager.state_dict() if eager is not None else {}, options=options)
    with torch.no_grad():  # the buffers (RoPE tables, sinusoid frequencies): not in the state dict, not sharded
        source = dict(eager.named_buffers()) if eager is not None else {}
        for name, buf in model.named_buffers():
            value = source[name].to(buf.device) if eager is not None else torch.empty_like(buf)
            dist.broadcast(value, src=0)
            buf.copy_(value)
    return model


__all__ = ["build", "parallelize", "transformer_blocks"]
