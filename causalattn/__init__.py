"""causalattn: fused attention for zero-init gated adapters, CAT supervision and the XG regulariser.

    import causalattn
    res = causalattn.attention(q, k, v, adapter=causalattn.Adapter(ka, va, gate),
                               supervision=mask, xg_tokens=2)
    loss = ce + causalattn.cat_loss(res.mass, mask) + lam * causalattn.xg_variance(res.xg, o_proj.weight)
"""
from causalattn.inputs import Adapter, AttentionOutput
from causalattn.losses import cat_amp, cat_loss, cat_row_losses, mutual_information, xg_variance
from causalattn.masks import CausalMask
from causalattn.spans import encode_with_causes
from causalattn.ops import attention
from causalattn.reference import attention_chunked, attention_dense
from causalattn.routing import Router

from causalattn.hf_autoregister import install as _register_with_transformers

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
