"""The Triton backend's host side: `attention_triton`, the torch.library ops around the fused kernels
of `causalattn.kernels`, their fake (meta) implementations and their autograd.

    causalattn::fused_attention(*OpInputs, *OpFlags) -> OpOutputs
    causalattn::fused_attention_backward(*OpGrads, *OpInputs, *OpOutputs, *OpFlags) -> InputGrads

Both schemas are derived from the NamedTuples of `causalattn.kernels.arguments` (field names and
type hints, in order), as are the fakes, the tensors saved for the backward and the gradients handed
back to autograd: an optional tensor is added there and in the launchers, and nowhere here. The ops
are registered with fakes and `register_autograd`, so torch.compile traces through them without graph
breaks. A torch.library op cannot return None: absent outputs cross its boundary as empty tensors.

Shapes: see `causalattn.inputs` (arguments) and `causalattn.kernels.arguments` (the ops' fields).
"""
from __future__ import annotations

import inspect
import math
import typing
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from causalattn.inputs import Adapter, AttentionOutput
from causalattn.kernels.arguments import InputGrads, OpFlags, OpGrads, OpInputs, OpOutputs
from causalattn.masks import CausalMask
from causalattn.problem import key_validity, xg_row_weights


def _split(args: tuple, *groups: type) -> list:
    """The flat op arguments as one NamedTuple per group, in the groups' order."""
    split, start = [], 0
    for group in groups:
        split.append(group._make(args[start:start + len(group._fields)]))
        start += len(group._fields)
    return split


def _optional_fields(group: type) -> frozenset[str]:
    return frozenset(name for name, hint in typing.get_type_hints(group).items()
                     if type(None) in typing.get_args(hint))


def _to_op(results: NamedTuple, like: Tensor) -> tuple[Tensor, ...]:
    """Results as the op returns them: None as an empty tensor (a fresh one each: outputs of a custom
    op may not alias)."""
    return tuple(like.new_empty(0, dtype=torch.float32) if value is None else value for value in results)


def _from_op(group: type, values: tuple) -> NamedTuple:
    """The op's results as `group`, its optional fields None where the op returned an empty tensor."""
    optional = _optional_fields(group)
    return group._make(None if name in optional and value.numel() == 0 else value
                       for name, value in zip(group._fields, values))


def _custom_op(name: str, groups: tuple[type, ...], results: type, impl: Callable, fake: Callable):
    """Register `impl(*groups) -> results` as the torch.library op `name` with the flat schema of the
    groups' fields, and `fake` (same arguments) as its fake."""
    parameters = [inspect.Parameter(field, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hint)
                  for group in groups for field, hint in typing.get_type_hints(group).items()]
    signature = inspect.Signature(parameters, return_annotation=tuple[(Tensor,) * len(results._fields)])

    def run(*args):
        split = _split(args, *groups)
        return _to_op(impl(*split), like=split[groups.index(OpInputs)].q)

    def run_fake(*args):
        split = _split(args, *groups)
        return _to_op(fake(*split), like=split[groups.index(OpInputs)].q)

    run.__signature__ = run_fake.__signature__ = signature
    op = torch.library.custom_op(name, run, mutates_args=())
    op.register_fake(run_fake)
    return op


def _forward(inputs: OpInputs, flags: OpFlags) -> OpOutputs:
    from causalattn.kernels.attention_fwd import attention_forward

    return attention_forward(inputs, flags)


def _forward_fake(inputs: OpInputs, flags: OpFlags) -> OpOutputs:
    from causalattn.kernels.attention_fwd import forward_outputs

    return forward_outputs(inputs, flags)


def _backward_kernels(grads: OpGrads, inputs: OpInputs, outputs: OpOutputs, flags: OpFlags) -> InputGrads:
    from causalattn.kernels.attention_bwd import attention_backward

    return attention_backward(grads, inputs, outputs, flags)


def _backward_fake(grads: OpGrads, inputs: OpInputs, outputs: OpOutputs, flags: OpFlags) -> InputGrads:
    """Each gradient like the input it is named after (None where that input is)."""
    present = {name: getattr(inputs, name) for name in InputGrads._fields}
    return InputGrads(**{name: None if value is None else torch.empty_like(value) for name, value in present.items()})


fused_attention = _custom_op("causalattn::fused_attention", (OpInputs, OpFlags), OpOutputs, _forward, _forward_fake)
fused_attention_backward = _custom_op("causalattn::fused_attention_backward", (OpGrads, OpInputs, OpOutputs, OpFlags),
                                      InputGrads, _backward_kernels, _backward_fake)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    op_inputs, flags = _split(inputs, OpInputs, OpFlags)
    # Every input and output is saved but xg: the backward reads it only through its gradient.
    ctx.save_for_backward(*op_inputs, *_from_op(OpOutputs, output)._replace(xg=None))
    ctx.flags = flags
    ctx.set_materialize_grads(False)


def _backward(ctx, *output_grads: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    saved = ctx.saved_tensors
    inputs, outputs = OpInputs._make(saved[:len(OpInputs._fields)]), OpOutputs._make(saved[len(OpInputs._fields):])
    grad = OpOutputs._make(output_grads)
    grads = OpGrads(
        grad_out=grad.out if grad.out is not None else torch.zeros_like(outputs.out),  # only statistics feed the loss
        grad_lse=grad.lse, grad_mass=grad.mass if outputs.mass is not None else None,
        grad_xg=grad.xg if ctx.flags.xg_tokens else None)
    input_grads = _from_op(InputGrads, fused_attention_backward(*grads, *inputs, *outputs, *ctx.flags))
    return tuple(getattr(input_grads, name, None) for name in OpInputs._fields) + (None,) * len(OpFlags._fields)


torch.library.register_autograd("causalattn::fused_attention", _backward, setup_context=_setup_context)


def attention_triton(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: Optional[float], key_lengths: Optional[Tensor],
    key_mask: Optional[Tensor], cu_seqlens: Optional[Tensor], max_seqlen: Optional[int], adapter: Optional[Adapter],
    supervision: Optional[CausalMask], xg_tokens: int, xg_pool: str,
) -> AttentionOutput:
    """`causalattn.attention` on the fused kernels; inputs already checked by `check_inputs`.

    Prepares what the kernels take: the last dim of q/k/v contiguous (other strides kept), side
    tensors contiguous in the kernels' dtypes, the gates per segment and query head in fp32, each
    adapter slot's segment, and the pooled XG's row weights."""
    batch, heads_q, n_q, head_dim = q.shape
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        num_samples = cu_seqlens.numel() - 1
    else:
        max_seqlen, num_samples = n_q, batch

    def last_dim_contiguous(t: Tensor) -> Tensor:
        return t if t.stride(-1) == 1 else t.contiguous()

    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    adapter_keys = adapter_values = gamma = slot_segment = None
    if adapter is not None:
        adapter_keys, adapter_values = adapter.keys.contiguous(), adapter.values.contiguous()
        gamma = adapter.gammas(heads_q).float().contiguous()  # (1 or B, S, Hq)
        if adapter.num_segments > 1:
            from causalattn.kernels.jit_helpers import slot_segments

            slot_segment = slot_segments(adapter.segment_sizes, q.device)
    xg_weight = None
    if xg_tokens and xg_pool == "sample":
        valid = key_validity(k.shape[2], key_lengths, key_mask)
        xg_weight = xg_row_weights(batch, n_q, valid, cu_seqlens, torch.float32, q.device).contiguous()
    inputs = OpInputs(
        q=q, k=k, v=v, adapter_keys=adapter_keys, adapter_values=adapter_values, gamma=gamma,
        key_lengths=key_lengths.to(torch.int32).contiguous() if key_lengths is not None else None,
        key_mask=key_mask.contiguous().view(torch.uint8) if key_mask is not None else None, cu_seqlens=cu_seqlens,
        mask_bits=supervision.bits if supervision is not None else None, xg_weight=xg_weight,
        slot_segment=slot_segment)
    flags = OpFlags(causal=causal, scale=float(scale if scale is not None else 1.0 / math.sqrt(head_dim)),
                    max_seqlen=max_seqlen, xg_tokens=xg_tokens, xg_pooled=xg_pool == "sample", num_samples=num_samples)
    out, lse, _, mass, xg = fused_attention(*inputs, *flags)
    return AttentionOutput(out, lse, mass if supervision is not None else None, xg if xg_tokens else None)
