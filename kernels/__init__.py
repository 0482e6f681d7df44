"""Triton kernels of causalattn, imported as `causalattn.kernels`.

    arguments.py       the fused op's arguments: flat (the torch.library op's fields) and grouped (the kernels')
    attention_fwd.py   forward kernel + launcher
    attention_bwd.py   the three backward kernels + launcher
    jit_helpers.py     @triton.jit helpers shared by both, and their host-side tables
    tiles.py           block sizes, warps and stages per kernel
    autotune.py        the backward launches' optional tile autotuning

No autograd and no Hugging Face here (see `causalattn.triton_backend`); the kernel modules import
Triton, this package and `arguments` do not, so `import causalattn` works without it.
"""
