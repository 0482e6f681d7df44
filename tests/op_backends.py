"""Shared pieces of the bad-input and fuzz tests: the op's backends, random inputs, error checks."""
import pytest
import torch

import causalattn
from causalattn import attention, attention_chunked, attention_dense

# The op's backends that exist in this build ("composed" joins when it is there).
OP_BACKENDS = [b for b in ("reference", "triton", "composed", "native") if b in causalattn.ops.BACKENDS]
HAS_TRITON = torch.cuda.is_available() or causalattn.ops._interpreting()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Every entry point that validates its arguments: the op on each backend and the two references.
ENTRY_POINTS = [f"op-{b}" for b in OP_BACKENDS] + ["dense", "chunked"]


def op_backend(backend: str) -> str:
    """`backend`, or skip the test when it is the triton backend and nothing can run it."""
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    return backend


def entry_point(name: str):
    """The function behind an ENTRY_POINTS name, with the signature of `attention_dense`."""
    if name == "dense":
        return attention_dense
    if name == "chunked":
        return lambda *a, **kw: attention_chunked(*a, rows_per_block=16, **kw)
    backend = op_backend(name[len("op-"):])
    return lambda *a, **kw: attention(*a, backend=backend, **kw)


def random_qkv(seed, batch=1, heads=(2, 1), n=(40, 40), dim=16, device=DEVICE):
    """float64 q (B, Hq, Nq, d), k and v (B, Hkv, Nk, d)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = ((batch, heads[0], n[0], dim), (batch, heads[1], n[1], dim), (batch, heads[1], n[1], dim))
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in shapes]


def raises_named(error, name, fn, *args, **kwargs) -> str:
    """Assert `fn` raises `error` whose message starts with the argument's name; return the message."""
    with pytest.raises(error) as raised:
        fn(*args, **kwargs)
    message = str(raised.value)
    assert message.startswith(name + ":") or message.startswith(name + " "), message
    return message
