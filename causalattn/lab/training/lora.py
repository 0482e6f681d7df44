"""LoRA beside the gated prompts: the lever that lets CAT's loss reach a real base model's attention.

With a frozen base, a prompt adapter moves the attention of the sequence tokens only indirectly: it adds
a gated branch of its own, while the scores among the sequence tokens (where CAT's loss is taken) stay
the base's `q_proj`/`k_proj` products. CAT's own code trains LoRA for that reason. `--lora-rank R`
injects PEFT's LoRA (`peft.inject_adapter_in_model`, the real `LoraConfig`) into the chosen projections
(`--lora-targets q,k` by default; v and o too on request) of the layers that carry prompts, and trains
them with their own learning rate (`--lora-lr`, CAT's 1e-3 by default, no weight decay).

The injected weights are ordinary trainable parameters outside the adapters, so the per-epoch
checkpoints, the final `adapter/` folder (`base_weights.safetensors`) and `--resume` carry them the way
they carry the q/k weights of `--train-qk`: the model of a resumed run gets the same injection first,
then the saved tensors by name.
"""
from __future__ import annotations

import argparse
import math
from typing import Optional

from torch import nn

# The attention projections LoRA may adapt, by the letter a flag names them with.
PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
DEFAULT_TARGETS = "q,k"
DEFAULT_LR = 1e-3  # CAT's learning rate for its LoRA runs
# lora_alpha = 2 x rank: the update is scaled by 2 at every rank, so changing the rank does not change
# the effective step size of a fresh B (PEFT's default alpha 8 would scale rank 16 by 0.5).
ALPHA_PER_RANK = 2
LORA_OPTIONS = ("lora_rank", "lora_targets", "lora_lr")
ADAPTER_NAME = "default"  # PEFT's name; the parameters are `...q_proj.lora_A.default.weight`


def parse_targets(text: str) -> tuple[str, ...]:
    """'q,k' -> ('q_proj', 'k_proj'); a ValueError naming --lora-targets for anything else."""
    letters = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not letters or not set(letters) <= set(PROJECTIONS) or len(set(letters)) != len(letters):
        raise ValueError(f"--lora-targets: {text!r}: expected a comma-separated subset of {','.join(PROJECTIONS)}, "
                         "each once (e.g. q,k)")
    return tuple(PROJECTIONS[letter] for letter in letters)


def check_options(rank: int, targets: str, lr: float, train_qk: bool) -> None:
    """The LoRA flags on their own and against --train-qk; a ValueError that starts with the flag."""
    if rank < 0:
        raise ValueError(f"--lora-rank: expected 0 (no LoRA) or a positive rank, got {rank}")
    parse_targets(targets)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lora-lr: expected a positive number, got {lr}")
    if rank and train_qk and {"q_proj", "k_proj"} & set(parse_targets(targets)):
        raise ValueError("--lora-rank: LoRA on q/k and --train-qk would both train the same projections; choose "
                         "one (pass --no-train-qk, or --lora-targets without q and k)")


def add_lora(model: nn.Module, rank: int, targets: str) -> list[str]:
    """Inject LoRA of `rank` into the `targets` projections of the layers that carry prompts; returns the
    adapted module names. The prompts, gates and anything else trainable before stay trainable (PEFT's
    injection would freeze every parameter but its own)."""
    from peft import LoraConfig, inject_adapter_in_model

    import causalattn.hf as cah  # here, not at the top: the flags (`--help`) must not load transformers

    adapted = cah.adapted_layers(model)
    if not adapted:
        raise ValueError("model: add the gated prompts first; LoRA goes on the layers that carry them")
    trainable = [p for p in model.parameters() if p.requires_grad]
    attention = {module: name for name, module in model.named_modules()}
    names = [f"{attention[m]}.{proj}" for m in cah.attention_modules(model) if m.layer_idx in adapted
             for proj in parse_targets(targets)]
    # full module names: PEFT matches a listed name by suffix, so only these layers are adapted
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=ALPHA_PER_RANK * rank, lora_dropout=0.0,
                                       target_modules=names, bias="none"), model, adapter_name=ADAPTER_NAME)
    for parameter in trainable:
        parameter.requires_grad_(True)
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The injected LoRA matrices (what --lora-lr trains)."""
    return [p for name, p in model.named_parameters() if ".lora_" in name]


def add_arguments(parser: argparse.ArgumentParser, rank: int, targets: str, lr: float) -> None:
    """The LoRA flags of `causalattn train` (defaults from TrainConfig)."""
    group = parser.add_argument_group("LoRA (PEFT) beside the prompts")
    group.add_argument("--lora-rank", type=int, default=rank, metavar="R",
                       help="inject PEFT LoRA of rank R into the attention projections of the layers that carry "
                            "prompts, so the CAT loss moves the base's own attention scores (default 0: none)")
    group.add_argument("--lora-targets", default=targets, metavar="LIST",
                       help=f"which projections get LoRA, a subset of {','.join(PROJECTIONS)} (default {targets})")
    group.add_argument("--lora-lr", type=float, default=lr,
                       help=f"AdamW peak learning rate of the LoRA matrices, no weight decay (default {lr:g}, CAT's)")


def describe(rank: int, targets: str) -> Optional[str]:
    """One line for the job's log, or None without LoRA."""
    if not rank:
        return None
    letters = ",".join(proj[0] for proj in parse_targets(targets))
    return f"LoRA rank {rank} (alpha {ALPHA_PER_RANK * rank}) on {letters} of the adapted layers"
