"""Several processes, one job: process groups, model wrapping and reductions for `causalattn train`.

Under `torchrun --nproc_per_node=K causalattn train ...` every process reads RANK / WORLD_SIZE /
LOCAL_RANK from the environment and joins a process group: NCCL with one GPU per process, gloo on CPU.
Without those variables the job runs in one process and every helper here is a no-op.

Two ways to spread the model:

* data parallel (default): `DistributedDataParallel` over the trainable adapter parameters; the frozen
  base model is replicated. Gradients are averaged across processes during the last micro-batch's
  backward of each optimizer step (`no_sync` for the others).
* `--fsdp`: FSDP2 `fully_shard` on every decoder layer and the root, so each process holds 1/K of the
  frozen base weights. The adapters are left out of the sharding (`ignored_params`) and replicated,
  and their gradients are averaged here after the last micro-batch: they are tiny (M x C per layer),
  and plain tensors keep optimizer state and checkpoints the same as in the data-parallel case.

Rank 0 alone writes checkpoints, reports and plots; the others wait at a barrier.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from causalattn.lab.training.config import ConfigError


@dataclass
class DistContext:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: Tensor) -> Tensor:
        """Element-wise sum over processes of a small tensor (returned on this process's device)."""
        values = values.to(self.device)
        if self.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object) on every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list:
        """Every process's `value`, by rank, on every process."""
        if not self.distributed:
            return [value]
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def _pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device: cuda was asked for but torch sees no CUDA device")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"--device: process {local_rank} on this node has no GPU of its own "
                              f"({torch.cuda.device_count()} visible); start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device_choice: str) -> DistContext:
    """Join the torchrun process group when there is one; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(device_choice, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Evaluation and checkpoints run on rank 0 while the others wait: allow for slow ones.
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60),
                                device_id=device if device.type == "cuda" else None)
    return DistContext(rank, world_size, local_rank, device)


def teardown(context: DistContext, *, completed: bool) -> None:
    """Leave the process group. After a completed job every rank first waits for the others (rank 0 ends
    later, writing the report), so that none tears its connections down while another still works; after
    an error none waits, since the others may never come."""
    if context.distributed and dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()


class ParallelModel:
    """The model as the training step uses it: `forward_module` to call, `module` (the plain HF model)
    for everything else, `no_sync` around all but the last micro-batch, `finish_gradients` before the
    optimizer step."""

    def __init__(self, module: nn.Module, context: DistContext, fsdp: bool):
        self.module = module
        self.context = context
        self.fsdp = fsdp
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.forward_module: nn.Module = module
        if not context.distributed:
            return
        if fsdp:
            self._shard_base()
        else:
            from torch.nn.parallel import DistributedDataParallel

            # Buffers (RoPE frequencies) are fixed: nothing to broadcast at each forward.
            device_ids = [context.device.index] if context.device.type == "cuda" else None
            self.forward_module = DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)

    def _shard_base(self) -> None:
        from torch.distributed.fsdp import fully_shard

        layer_classes = set(getattr(self.module, "_no_split_modules", None) or ())
        layers = [m for m in self.module.modules() if type(m).__name__ in layer_classes]
        if not layers:
            raise ConfigError(f"--fsdp: found no decoder layers to shard in {type(self.module).__name__} "
                              "(it lists no _no_split_modules)")
        adapters = set(self.trainable)
        for layer in layers:
            fully_shard(layer, ignored_params=adapters)
        fully_shard(self.module, ignored_params=adapters)

    def no_sync(self, skip: bool) -> ContextManager:
        """DDP's no_sync when `skip` (a micro-batch that is not the last of its step), else nothing."""
        if skip and isinstance(self.forward_module, nn.parallel.DistributedDataParallel):
            return self.forward_module.no_sync()
        return contextlib.nullcontext()

    def finish_gradients(self) -> None:
        """Average the adapter gradients over processes where DDP did not (FSDP mode), in one reduction."""
        if not (self.context.distributed and self.fsdp):
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.context.world_size
        offset = 0
        for parameter, grad in zip(self.trainable, grads):
            count = grad.numel()
            parameter.grad = flat[offset:offset + count].view_as(grad).to(grad.dtype)
            offset += count
