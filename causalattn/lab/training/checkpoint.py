"""Per-epoch checkpoints of one run: the adapters plus everything needed to continue bit for bit.

    <run dir>/checkpoints/epoch-002/adapter_model.safetensors   causalattn.hf.save_adapters
                                    adapter_config.json
                                    base_weights.safetensors    trained weights outside the adapters
                                                                (--train-qk's q/k, --lora-rank's LoRA)
                                    trainer_state.pt            optimizer, scheduler, RNG states by rank
                                    progress.json               epoch, step, loss history, accuracies,
                                                                the options that shape the trajectory
    <run dir>/checkpoints/latest                                name of the newest complete checkpoint

A checkpoint is written into a temporary folder beside its final place and renamed into place, then
`latest` is replaced (write + rename): a crash at any moment leaves the previous checkpoint usable,
and the staging leftovers of a killed write are removed when the next run starts.
Nothing random is drawn during training (the data order is a function of seed and epoch), but the RNG
states are restored anyway so models with stochastic layers resume on the same stream.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from causalattn.hf import load_adapters, save_adapters
from causalattn.hf.contract import ADAPTER_ATTR
from causalattn.lab.training.config import ConfigError

STATE_NAME = "trainer_state.pt"
PROGRESS_NAME = "progress.json"
LATEST_NAME = "latest"
BASE_WEIGHTS_NAME = "base_weights.safetensors"


@dataclass
class Progress:
    """Where a run stands after `epoch` complete epochs."""

    epoch: int
    step: int
    history: list[dict]
    accuracy: list[dict]
    train_seconds: float
    options: dict


def rng_state() -> dict:
    """This process's random states (python, torch CPU, and CUDA when present)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def trained_base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of the trainable parameters outside the adapters (the q/k weights of --train-qk, the
    LoRA matrices of --lora-rank, which a resumed run's model has injected under the same names)."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters()
            if p.requires_grad and ADAPTER_ATTR not in name}


def save_trained_base_weights(model: nn.Module, directory: Path) -> None:
    """Write `trained_base_weights` beside the adapters (atomically); nothing when there are none."""
    from safetensors.torch import save_file

    tensors = trained_base_weights(model)
    if tensors:
        tmp = directory / f".{BASE_WEIGHTS_NAME}.{uuid.uuid4().hex}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, directory / BASE_WEIGHTS_NAME)


def load_trained_base_weights(model: nn.Module, directory: Path) -> None:
    """Copy the weights `save_trained_base_weights` wrote into `model` (when the file is there)."""
    from safetensors.torch import load_file

    path = directory / BASE_WEIGHTS_NAME
    if not path.is_file():
        return
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(str(path)).items():
            if name not in parameters:
                raise ValueError(f"{path}: holds {name!r}, which the model does not have")
            parameters[name].copy_(tensor)


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


# Staging names of `save_checkpoint` and `_write_text_atomic`: "." + final name + "." + uuid4 hex + ".tmp".
_STAGING_NAME = re.compile(r"\.[^/]+\.[0-9a-f]{32}\.tmp")


def remove_staging_leftovers(run_dir: Path) -> list[Path]:
    """Delete the staging folders and files a killed checkpoint write left behind; return them.

    Only names of the staging pattern are touched, never a complete checkpoint or `latest`. Call it
    when a run starts, before any checkpoint of this run is written (rank 0 only)."""
    root = checkpoint_root(run_dir)
    leftovers = sorted(p for p in root.iterdir() if _STAGING_NAME.fullmatch(p.name)) if root.is_dir() else []
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return leftovers


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    progress: Progress, rng_states: list[dict]) -> Path:
    """Write the checkpoint after `progress.epoch` epochs (called on rank 0 with every rank's RNG state)."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{progress.epoch:03d}"
    final = root / name
    staging = root / f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        save_adapters(model, staging)
        save_trained_base_weights(model, staging)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states},
                   staging / STATE_NAME)
        (staging / PROGRESS_NAME).write_text(json.dumps(progress.__dict__, indent=1) + "\n", encoding="utf-8")
        if final.exists():  # rewritten after a crash between the rename and `latest`
            shutil.rmtree(final)
        os.rename(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    _write_text_atomic(root / LATEST_NAME, name + "\n")
    return final


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None when it has none."""
    pointer = checkpoint_root(run_dir) / LATEST_NAME
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text(encoding="utf-8").strip()
    if not (path / PROGRESS_NAME).is_file():
        raise FileNotFoundError(f"{pointer}: names {path.name}, which is not a complete checkpoint")
    return path


def read_progress(checkpoint: Path, options: dict) -> Progress:
    """The progress record of `checkpoint`, after checking it was made with the same trajectory options."""
    progress = Progress(**json.loads((checkpoint / PROGRESS_NAME).read_text(encoding="utf-8")))
    changed = sorted(k for k in set(options) | set(progress.options) if options.get(k) != progress.options.get(k))
    if changed:
        details = "; ".join(f"{k}: checkpoint {progress.options.get(k)!r}, now {options.get(k)!r}" for k in changed)
        raise ConfigError(f"--resume: {checkpoint} was made with other options, so the run could not continue the "
                          f"same trajectory ({details})")
    return progress


def restore(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, rank: int) -> None:
    """Load adapters, optimizer, scheduler and this rank's RNG state from `checkpoint`."""
    load_adapters(model, checkpoint)
    load_trained_base_weights(model, checkpoint)
    state = torch.load(checkpoint / STATE_NAME, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][rank])
