"""Packaging glue that pyproject.toml cannot express.

`kernels/` lives at the top level of the repository (Triton sources only) but is imported as
`causalattn.kernels`; a top-level `kernels` package would shadow Hugging Face's hub-kernels
package that transformers probes. `csrc/` (the C++ sources `causalattn.native` compiles on first use)
ships the same way, as `causalattn/csrc`.
"""
from setuptools import find_packages, setup

packages = [p for p in find_packages(include=["causalattn", "causalattn.*"])]
packages += ["causalattn.kernels", "causalattn.csrc"]

setup(
    packages=packages,
    package_dir={"causalattn": "causalattn", "causalattn.kernels": "kernels", "causalattn.csrc": "csrc"},
    package_data={"causalattn.csrc": ["*.cpp", "*.h"]},
)
