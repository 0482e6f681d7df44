"""Regenerate the CUDA dispatch table of `backend="auto"` from benchmark rows.

    python -m benchmarks --preset dispatch --out OUT            # on the GPU: fused vs composed, 5 densities
    python -m benchmarks.dispatch_table OUT/dispatch.csv --verified [--out causalattn/dispatch_table.json]

For every (device capability, dtype, head dim, features, density bucket) measured fwd+bwd, the rule
names the faster backend: the fused op ("causalattn<features>" rows, backend "triton") or the composed
one ("composed<features>"), by the geometric mean of their time ratio over the measured shapes. Keys
measured already in the existing table and not in the new rows are kept, so sessions on different
devices add up. `--verified` says the GPU tests passed on that device in the same session: only such
rules are used by `backend="auto"` (see `causalattn.dispatch`); without it they are recorded, not used.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.harness import read_rows
from causalattn.dispatch import KEY_FIELDS, TABLE_PATH, density_bucket

FUSED, COMPOSED = "causalattn", "composed"


def _features(provider: str) -> tuple[str, str]:
    """("triton" | "composed", dispatch feature label) of a provider name, e.g. composed+all -> adapter+cat+xg."""
    backend, _, suffix = provider.partition("+")
    features = {"": "none", "adapter": "adapter", "cat": "cat", "xg": "adapter+xg", "all": "adapter+cat+xg"}[suffix]
    return ("triton" if backend == FUSED else "composed"), features


def rules_from_rows(rows: Sequence[dict[str, Any]], capability: str, verified: bool = False) -> list[dict[str, Any]]:
    """One rule per measured key: the backend with the lower geometric-mean time, that speed-up, and
    whether the device's correctness tests passed (`verified`)."""
    timings: dict[tuple, dict[tuple, dict[str, float]]] = {}
    for row in rows:
        backend_name = row["provider"].partition("+")[0]
        if backend_name not in (FUSED, COMPOSED) or row["status"] != "ok" or row["mode"] != "fwd+bwd":
            continue
        backend, features = _features(row["provider"])
        supervised = float(row.get("supervised") or 0.0)
        key = (capability, row["dtype"], str(row["head_dim"]), features, density_bucket(features, supervised))
        shape = (row["batch"], row["seq_len"], row["heads_q"], row["heads_kv"], row.get("supervised", ""))
        timings.setdefault(key, {}).setdefault(shape, {})[backend] = float(row["median_ms"])
    rules = []
    for key, shapes in sorted(timings.items()):
        ratios = [t["composed"] / t["triton"] for t in shapes.values() if len(t) == 2]
        if not ratios:
            continue
        composed_over_fused = math.exp(sum(map(math.log, ratios)) / len(ratios))
        rules.append({**dict(zip(KEY_FIELDS, key)), "backend": "composed" if composed_over_fused < 1 else "triton",
                      "composed_over_fused": round(composed_over_fused, 3), "shapes": len(ratios),
                      "verified": verified})
    return rules


def merge(existing: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    replaced = {tuple(str(r[f]) for f in KEY_FIELDS) for r in new}
    kept = [r for r in existing if tuple(str(r[f]) for f in KEY_FIELDS) not in replaced]
    return sorted([*kept, *new], key=lambda r: tuple(str(r[f]) for f in KEY_FIELDS))


def capability_of(given: Optional[str]) -> str:
    if given:
        return given
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--capability: no CUDA device here to read it from; give it (e.g. 9.0)")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dispatch_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="+", type=Path, help="result files of the dispatch preset")
    parser.add_argument("--out", type=Path, default=TABLE_PATH, help="the table to update (default: the package's)")
    parser.add_argument("--capability", help="compute capability the rows were measured on (default: this GPU's)")
    parser.add_argument("--verified", action="store_true",
                        help="the GPU correctness tests passed on this device in the same session: "
                             "backend='auto' may use these rules")
    args = parser.parse_args(argv)
    rows = [row for path in args.csv for row in read_rows(path) if row.get("device_type") == "cuda"]
    if not rows:
        print("no CUDA rows in " + ", ".join(map(str, args.csv)) + ": table unchanged")
        return 0
    new = rules_from_rows(rows, capability_of(args.capability), args.verified)
    table = json.loads(args.out.read_text()) if args.out.is_file() else {"rules": []}
    table["rules"] = merge(table.get("rules", []), new)
    scratch = args.out.with_name(args.out.name + ".tmp")
    scratch.write_text(json.dumps(table, indent=2) + "\n")
    os.replace(scratch, args.out)
    for rule in new:
        print(f"{rule['capability']} {rule['dtype']} d={rule['head_dim']} {rule['features']:15s} rows {rule['density']:5s}"
              f" -> {rule['backend']:8s} (composed / fused = {rule['composed_over_fused']:.2f} over {rule['shapes']} shapes)"
              + ("" if rule["verified"] else "  [not verified: recorded, not used]"))
    print(f"{len(new)} rules from {len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
