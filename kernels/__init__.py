"""Triton kernels of causalattn, imported as `causalattn.kernels`.

Only `@triton.jit` kernels and their thin launchers live here (no autograd, no Hugging Face); the
submodules import Triton, this package does not, so `import causalattn` works without it.
"""
