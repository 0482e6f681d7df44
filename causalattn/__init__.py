"""causalattn: fused attention for zero-init gated adapters, CAT supervision and the XG regulariser.

    import causalattn
    res = causalattn.attention(q, k, v, adapter=causalattn.Adapter(ka, va, gate),
                               supervision=mask, xg_tokens=2)
    loss = ce + causalattn.cat_loss(res.mass, mask) + lam * causalattn.xg_variance(res.xg, o_proj.weight)
"""
import importlib.util as _importlib_util
import pathlib as _pathlib
import sys as _sys

# In a source checkout kernels/ sits beside this package; an install puts it inside as
# causalattn/kernels. Alias the source directory so `causalattn.kernels` resolves either way.
_source_kernels = _pathlib.Path(__file__).resolve().parent.parent / "kernels"
if "causalattn.kernels" not in _sys.modules and not (_pathlib.Path(__file__).parent / "kernels").is_dir() \
        and (_source_kernels / "__init__.py").is_file():
    _spec = _importlib_util.spec_from_file_location(
        "causalattn.kernels", _source_kernels / "__init__.py", submodule_search_locations=[str(_source_kernels)])
    _module = _importlib_util.module_from_spec(_spec)
    _sys.modules["causalattn.kernels"] = _module
    _spec.loader.exec_module(_module)
    kernels = _module

from causalattn.inputs import Adapter, AttentionOutput  # noqa: E402
from causalattn.losses import cat_amp, cat_loss, cat_row_losses, mutual_information, xg_variance  # noqa: E402
from causalattn.masks import CausalMask, encode_with_causes  # noqa: E402
from causalattn.ops import attention  # noqa: E402
from causalattn.reference import attention_chunked, attention_dense  # noqa: E402
from causalattn.routing import Router  # noqa: E402

from causalattn.hf_autoregister import install as _register_with_transformers  # noqa: E402

__version__ = "0.1.0"

_register_with_transformers()  # attn_implementation="causalattn" without `import causalattn.hf`

__all__ = [
    "Adapter",
    "AttentionOutput",
    "CausalMask",
    "Router",
    "attention",
    "attention_chunked",
    "attention_dense",
    "cat_amp",
    "cat_loss",
    "cat_row_losses",
    "encode_with_causes",
    "mutual_information",
    "xg_variance",
]
