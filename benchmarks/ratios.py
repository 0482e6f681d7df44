"""Time ratios of the fused op against sdpa-flash and against the fastest SDPA backend, from sweep CSVs.

    python -m benchmarks.ratios kernel-core.csv [all-features.csv ...] [--providers causalattn ...]

One line per (mode, shape, provider): the provider's median ms, its ratio to sdpa-flash and to the
best successful SDPA backend of the same shape and mode (ratio > 1: slower than SDPA). The GPU
session prints this after each sweep, so a cut session still reports what it measured.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.harness import KEY_FIELDS, best_sdpa

SHAPE_KEY = tuple(f for f in KEY_FIELDS if f != "provider")


def ratio_lines(rows: list[dict], providers: Optional[Sequence[str]]) -> list[str]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[f] for f in SHAPE_KEY), []).append(row)
    lines = [f"{'mode':8s} {'N':>6s} {'Hkv':>4s} {'d':>4s} {'provider':24s} {'ms':>9s} {'/flash':>7s} {'/best':>7s} best SDPA"]
    for key, group in sorted(groups.items(), key=lambda kv: (kv[0][1], int(kv[0][3]), int(kv[0][5]))):
        by_name = {r["provider"]: r for r in group if r["status"] == "ok"}
        flash, best = by_name.get("sdpa-flash"), best_sdpa(group)
        for name, row in sorted(by_name.items()):
            if (providers and name not in providers) or (not providers and not name.startswith("causalattn")):
                continue
            ms = float(row["median_ms"])
            to_flash = f"{ms / float(flash['median_ms']):.2f}" if flash else "-"
            to_best = f"{ms / float(best['median_ms']):.2f}" if best else "-"
            lines.append(f"{row['mode']:8s} {row['seq_len']:>6s} {row['heads_kv']:>4s} {row['head_dim']:>4s} "
                         f"{name:24s} {ms:9.3f} {to_flash:>7s} {to_best:>7s} {best['provider'] if best else '-'}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", nargs="+", type=Path)
    parser.add_argument("--providers", nargs="+", help="providers to list (default: every causalattn* one)")
    args = parser.parse_args(argv)
    rows = []
    for path in args.csv:
        if path.exists():
            with open(path, newline="") as file:
                rows += list(csv.DictReader(file))
    if not rows:
        print("ratios: no results (" + ", ".join(map(str, args.csv)) + ")")
        return 0
    print("\n".join(ratio_lines(rows, args.providers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
