"""Checkpoints of one run: the adapters plus everything needed to continue bit for bit.

    <run dir>/checkpoints/epoch-002/adapter_model.safetensors   causalattn.hf.save_adapters
                                    causalattn_adapter.json
                                    base_weights.safetensors    trained weights outside the adapters
                                                                (--train-qk's q/k, --lora-rank's LoRA)
                                    trainer_state.pt            optimizer, scheduler, RNG states by rank
                                                                (and a step checkpoint's epoch routes)
                                    progress.json               epoch, step, loss history, accuracies,
                                                                the options that shape the trajectory
                                    causalattn_manifest.json    size and SHA-256 of every file above
    <run dir>/checkpoints/step-000120/...                       the same after optimizer step 120 (--save-steps)
    <run dir>/checkpoints/latest                                name of the newest checkpoint written

A checkpoint is written into a temporary folder beside its final place, sealed with its manifest
(`causalattn.checkpoint_files`, written last) and renamed into place, then `latest` is replaced (write +
rename): a crash at any moment leaves the previous checkpoints usable, and the staging leftovers of a
killed write are removed when the next run starts. A resumed run verifies the checkpoints newest first
against their manifests and continues from the first intact one; damaged ones newer than it are moved
aside (`<name>.damaged`), never deleted, and every skip names its bad file (`latest` is only a pointer
for people: the order comes from the names). A run whose checkpoints all predate manifests resumes
from the newest unverified, and one that cannot be read is a ConfigError naming it. Nothing random is drawn during training (the data order
is a function of seed and epoch), but the RNG states are restored anyway so models with stochastic
layers resume on the same stream.
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
from typing import Callable, Optional

import torch
from torch import nn

from causalattn.checkpoint_files import is_sealed, newest_intact, no_intact_message, seal
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


def epoch_name(epoch: int) -> str:
    """The checkpoint written after `epoch` complete epochs."""
    return f"epoch-{epoch:03d}"


def step_name(step: int) -> str:
    """The checkpoint written after optimizer step `step` inside an epoch (--save-steps)."""
    return f"step-{step:06d}"


_CHECKPOINT_NAME = re.compile(r"(epoch|step)-(\d+)")


def save_checkpoint(run_dir: Path, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    progress: Progress, rng_states: list[dict], extra_state: Optional[dict] = None) -> Path:
    """Write checkpoint `name` (`epoch_name` / `step_name`; rank 0, with every rank's RNG state);
    `extra_state` joins the optimizer's in trainer_state.pt. A failed write (a full disk, a folder that
    became read-only) is a ConfigError naming the folder: the previous checkpoints are untouched."""
    root = checkpoint_root(run_dir)
    final = root / name
    staging = root / f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        save_adapters(model, staging)
        save_trained_base_weights(model, staging)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states,
                    **(extra_state or {})}, staging / STATE_NAME)
        (staging / PROGRESS_NAME).write_text(json.dumps(progress.__dict__, indent=1) + "\n", encoding="utf-8")
        seal(staging)  # last, inside the rename: a checkpoint in place always has its manifest
        # never over an existing folder: a resume continues after its newest intact checkpoint and moves the
        # damaged newer ones aside, so this name is free (os.rename refuses a non-empty folder otherwise)
        os.rename(staging, final)
        _write_text_atomic(root / LATEST_NAME, name + "\n")
    except OSError as error:
        raise ConfigError(f"--output-dir: could not write the checkpoint {final} ({error.strerror or error}); "
                          "the checkpoints written before it are intact: make room and rerun with --resume") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def remove_step_checkpoints_before(run_dir: Path, step: int) -> None:
    """Delete the step checkpoints older than `step` (called once an epoch checkpoint at `step` is written
    and sealed: they can no longer be the newest intact one unless it and every later one is damaged)."""
    for path in checkpoint_root(run_dir).iterdir():
        match = _CHECKPOINT_NAME.fullmatch(path.name)
        if match and match[1] == "step" and int(match[2]) < step:
            shutil.rmtree(path)


def checkpoints_newest_first(run_dir: Path, steps_per_epoch: int, total_steps: int) -> list[Path]:
    """The run's checkpoint folders, newest first: ordered by the optimizer step they follow, an epoch
    checkpoint after a step checkpoint of the same step (it also holds that epoch's evaluation)."""
    root = checkpoint_root(run_dir)
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = _CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir():
            number = int(match[2])
            step = min(number * steps_per_epoch, total_steps) if match[1] == "epoch" else number
            found.append(((step, match[1] == "epoch"), path))
    return [path for _, path in sorted(found, reverse=True)]


def _check_latest(root: Path, log: Callable[[str], None]) -> None:
    """Report a damaged `latest` pointer (the checkpoints are chosen by their names, not by it)."""
    pointer = root / LATEST_NAME
    if not pointer.exists():
        return
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        name, problem = "", f"unreadable ({error})"
    else:
        problem = "empty" if not name else None
    if name and not _CHECKPOINT_NAME.fullmatch(name):
        problem = f"names {name!r}, which is not a checkpoint name"
    elif name and not (root / name).is_dir():
        problem = f"names {name}, which does not exist"
    if problem:
        log(f"{pointer}: {problem} (expected the name of the newest checkpoint); choosing among the "
            "checkpoint folders themselves")


def select_checkpoint(run_dir: Path, steps_per_epoch: int, total_steps: int,
                      log: Callable[[str], None]) -> Optional[Path]:
    """The newest intact checkpoint of a run (rank 0), None when the run has none. Damaged ones newer than
    it are reported (each naming its bad file) and moved aside to `<name>.damaged`, so that the resumed
    run can write their names again; when checkpoints exist but none is intact, a ConfigError (a job is
    never silently restarted from zero)."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        _check_latest(root, log)
    candidates = checkpoints_newest_first(run_dir, steps_per_epoch, total_steps)
    chosen, problems = newest_intact(candidates, log)
    if candidates and chosen is None:
        raise ConfigError("--resume: " + no_intact_message(root, problems))
    for damaged in candidates[:len(problems)]:
        aside = damaged.with_name(damaged.name + ".damaged")
        suffix = 1
        while aside.exists():
            suffix += 1
            aside = damaged.with_name(f"{damaged.name}.damaged-{suffix}")
        os.rename(damaged, aside)
        log(f"moved the damaged {damaged.name} aside to {aside.name}")
    return chosen


def read_progress(checkpoint: Path, options: dict) -> Progress:
    """The progress record of `checkpoint`, after checking it was made with the same trajectory options."""
    progress = Progress(**json.loads((checkpoint / PROGRESS_NAME).read_text(encoding="utf-8")))
    changed = sorted(k for k in set(options) | set(progress.options) if options.get(k) != progress.options.get(k))
    if changed:
        details = "; ".join(f"{k}: checkpoint {progress.options.get(k)!r}, now {options.get(k)!r}" for k in changed)
        raise ConfigError(f"--resume: {checkpoint} was made with other options, so the run could not continue the "
                          f"same trajectory ({details})")
    return progress


def resume_from(checkpoint: Path, options: dict, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                rank: int) -> tuple[Progress, dict]:
    """`read_progress` then `restore`. A checkpoint written before manifests is read unverified: what
    cannot be read in it is a ConfigError naming it (a verified one was checked byte for byte already)."""
    try:
        progress = read_progress(checkpoint, options)
        return progress, restore(checkpoint, model, optimizer, scheduler, rank)
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a damaged unverified file raises
        if is_sealed(checkpoint):
            raise
        raise ConfigError(f"--resume: {checkpoint} was written before manifests and cannot be read "
                          f"({type(error).__name__}: {error}); nothing was deleted") from None


def restore(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, rank: int) -> dict:
    """Load adapters, optimizer, scheduler and this rank's RNG state from a verified `checkpoint`; returns
    the rest of its trainer state (what `save_checkpoint` got as `extra_state`)."""
    load_adapters(model, checkpoint)
    load_trained_base_weights(model, checkpoint)
    state = torch.load(checkpoint / STATE_NAME, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    set_rng_state(state.pop("rng")[rank])
    return state
