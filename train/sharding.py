"""Sharded data parallelism for training (FSDP2), and the full-tensor view checkpoints need.

- ``shard(objective, device, mixed_precision)``: ``fully_shard`` each decoder layer, then the whole
  objective (embeddings, encoders, reconstructor), over all processes. Every parameter, frozen base
  weights included, then holds 1/world of its rows on each process; a layer's weights are gathered
  for its forward and backward and freed after, and gradients are reduce-scattered (averaged, as DDP
  does), so the optimizer state is sharded too.
- ``gather_trainable(module)`` / ``load_trainable(module, tensors)``: the trainable parameters as whole
  tensors by name, out of and into the shards (plain tensors when nothing is sharded).
- ``optimizer_state(module, opt)`` / ``load_optimizer_state(module, opt, state)``: the optimizer state
  as one full, name-keyed dict, so a run saved on N processes resumes on any number.

Each of these is a collective when the module is sharded: every process must call it.

Why torch's ``fully_shard`` and not accelerate's FSDP plugin: accelerate (1.15) turns its plugin on
only for GPU-type processes (``state.py`` picks ``DistributedType.FSDP`` from ``MULTI_GPU``/``XPU``/...);
with CPU processes it silently trains with DDP. ``fully_shard`` is what accelerate's FSDP2 path
calls; calling it here gives the same sharding on CUDA (nccl) and on CPU (gloo), where it is tested.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    layers = getattr(lm.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"fsdp: cannot find the decoder layers of {type(lm).__name__} (expected .layers)")
    return layers


def shard(objective: nn.Module, device: torch.device, mixed_precision: str = "no") -> None:
    """Shard ``objective`` (a ``ZipObjective``) in place across the default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # bf16: compute in bf16 from fp32 master weights, gradients reduced in fp32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    for layer in decoder_layers(objective.model.lm):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(objective, mesh=mesh, mp_policy=mp)


def reshard(module: nn.Module) -> None:
    """Back to sharded parameters after a forward without backward (evaluation): FSDP keeps the
    root's weights gathered after its forward, and the optimizer holds the sharded ones."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def gather_trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = full.detach().cpu().clone()
    return out


def load_trainable(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(module, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def optimizer_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return get_optimizer_state_dict(module, opt, options=FULL)


def load_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(module, opt, state, options=StateDictOptions(full_state_dict=True))
