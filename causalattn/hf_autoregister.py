"""`import causalattn` makes `attn_implementation="causalattn"` available to transformers, cheaply.

Registering needs `transformers.modeling_utils` (AttentionInterface), whose import costs seconds
(about 8 s on a busy 2-core machine, against ~3 s for torch): too much to pay on every `import
causalattn`, e.g. for `causalattn demo` or `--help`. So the registration waits for transformers:

* when `transformers.modeling_utils` is already imported, `causalattn.hf` is imported now;
* otherwise, when transformers is installed, a meta-path finder waits for that module's import and
  imports `causalattn.hf` right after it has run, before any model can be built from it;
* without transformers nothing happens.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Optional, Sequence

TRIGGER = "transformers.modeling_utils"


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of TRIGGER so that `causalattn.hf` is imported after it."""

    def find_spec(self, name: str, path: Optional[Sequence[str]], target=None):
        if name != TRIGGER:
            return None
        sys.meta_path.remove(self)  # once, and not for the lookup below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        execute = loader.exec_module

        def exec_module(module):
            execute(module)
            import causalattn.hf  # noqa: F401  (registers the attention and mask functions)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now, or when transformers' model code is imported (see the module docstring)."""
    if TRIGGER in sys.modules:
        import causalattn.hf  # noqa: F401
        return
    if any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        return
    if importlib.util.find_spec("transformers") is not None:
        sys.meta_path.insert(0, _RegisterAfterImport())
