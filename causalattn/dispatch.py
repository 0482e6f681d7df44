"""`backend="auto"` on CUDA: the fused Triton kernels or the composed path, from measurements.

The rule: a committed table (`dispatch_table.json` beside this file) lists, per measured
(compute capability, dtype, head dim, features, supervised-row density bucket), which backend was
faster fwd+bwd. `auto` takes the table's choice for an exact key match of a *verified* rule (written by
a GPU session whose correctness tests passed on that compute capability) and "composed" for anything
else: the fused kernels run by default only where a GPU of that kind has compiled them, checked them
against the reference and timed them. `backend="triton"` always runs them. The GPU session
(`benchmarks/gpu_session.sh`) regenerates the table from its own measurements
(`python -m benchmarks.dispatch_table --verified ...` after its tests pass).

Density buckets (fraction of query rows that have at least one cause; only with CAT supervision):
    "0.3%" (< 1 %), "3%" (1-6 %), "10%" (6-20 %), "30%" (20-60 %), "100%" (>= 60 %); "-" without CAT.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
import torch

TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
DEFAULT_CUDA_BACKEND = "composed"  # portable PyTorch: what runs where nothing was verified
# (upper edge, label): the sweep measures 0.3 %, 3 %, 10 %, 30 % and 100 % of rows supervised.
DENSITY_BUCKETS = ((0.01, "0.3%"), (0.06, "3%"), (0.2, "10%"), (0.6, "30%"), (float("inf"), "100%"))
KEY_FIELDS = ("capability", "dtype", "head_dim", "features", "density")


def density_bucket(features: str, supervised_fraction: float) -> str:
    """The table's density label for a call: "-" when no CAT mass is computed."""
    if "cat" not in features.split("+"):
        return "-"
    return next(label for edge, label in DENSITY_BUCKETS if supervised_fraction < edge)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=4)
def load_table(path: Path = TABLE_PATH) -> dict[tuple, str]:
    """{key: backend} of the verified rules in the committed JSON (`{"rules": [{capability, dtype,
    head_dim, features, density, backend, verified, ...}]}`); an absent file is an empty table. A rule
    measured without passing correctness tests is kept in the file for the record but never used."""
    if not path.is_file():
        return {}
    rules = json.loads(path.read_text()).get("rules", [])
    return {tuple(str(rule[f]) for f in KEY_FIELDS): rule["backend"] for rule in rules if rule.get("verified") is True}


def lookup(capability: str, dtype: torch.dtype, head_dim: int, features: str, supervised_fraction: float,
           table: dict[tuple, str]) -> str:
    """The table's backend for one call's key, or DEFAULT_CUDA_BACKEND when no verified rule covers it."""
    key = (capability, dtype_name(dtype), str(head_dim), features, density_bucket(features, supervised_fraction))
    return table.get(key, DEFAULT_CUDA_BACKEND)


def choose_cuda_backend(device: torch.device, dtype: torch.dtype, head_dim: int, features: str,
                        supervised_fraction: float) -> str:
    """"triton" or "composed" for a CUDA call (see the module docstring)."""
    major, minor = torch.cuda.get_device_capability(device)
    return lookup(f"{major}.{minor}", dtype, head_dim, features, supervised_fraction, load_table())
