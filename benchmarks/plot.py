"""Plots of benchmark result CSVs: time and peak memory per provider against N.

    python -m benchmarks.plot benchmarks/results/kernel-core.csv [more.csv ...] [--out DIR]

One PNG per (CSV, device, mode, fixed axes: Hq, Hkv, d, M, dtype, tokens per case): left, the median
time with q20/q80 error bars; right, the peak memory; log-log over N, one line per provider, only
rows with status "ok". Needs matplotlib; without it the script says so and exits successfully, so a
results pipeline does not fail on a machine without plotting libraries.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

# The columns that stay fixed within one figure (batch varies with N at a fixed token count).
FIGURE_AXES = ("heads_q", "heads_kv", "head_dim", "adapter_len", "dtype")


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def figure_groups(rows: Sequence[dict[str, str]]) -> dict[tuple[str, ...], list[dict[str, str]]]:
    """Successful rows grouped by (device, mode, fixed axes, tokens per case)."""
    groups: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for row in rows:
        if row.get("status") != "ok":
            continue
        tokens = str(int(row["batch"]) * int(row["seq_len"]))
        key = (row["device"], row["mode"], *(row[a] for a in FIGURE_AXES), tokens)
        groups.setdefault(key, []).append(row)
    return groups


def load_pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a message) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots written (pip install matplotlib)")
        return None
    return plt


def provider_style(plt, index: int, provider: str) -> dict:
    """The house style of one provider's line: a tab20 colour (up to 20 providers without a repeat),
    round markers, the fused op's variants solid and everything it is compared with dashed."""
    colors = plt.get_cmap("tab20").colors
    return dict(color=colors[index % len(colors)], marker="o", label=provider,
                linestyle="-" if provider.startswith("causalattn") else "--")


def style_axes(axes_and_labels) -> None:
    """Log2 N on x, log y, the y label, a light grid: the axes of every benchmark figure."""
    for ax, label in axes_and_labels:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)


def plot_csv(path: Path, out_dir: Path, plt) -> list[Path]:
    """Write the figures of one CSV; returns the PNG paths."""
    written = []
    for key, rows in figure_groups(_read(path)).items():
        device, mode, heads_q, heads_kv, head_dim, adapter_len, dtype, tokens = key
        fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(14, 5))
        for index, provider in enumerate(sorted({r["provider"] for r in rows})):
            style = provider_style(plt, index, provider)
            points = sorted((int(r["seq_len"]), r) for r in rows if r["provider"] == provider)
            n = [p[0] for p in points]
            median = [float(p[1]["median_ms"]) for p in points]
            below = [m - float(p[1]["q20_ms"]) for m, p in zip(median, points)]
            above = [float(p[1]["q80_ms"]) - m for m, p in zip(median, points)]
            time_ax.errorbar(n, median, yerr=[below, above], capsize=3, **style)
            memory = [(x, float(p[1]["peak_mb"])) for x, p in zip(n, points) if p[1].get("peak_mb")]
            if memory:
                memory_ax.plot([x for x, _ in memory], [y for _, y in memory], **style)
        style_axes(((time_ax, "median time (ms), q20-q80 bars"), (memory_ax, "peak memory (MB)")))
        memory_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle(f"{mode} | {device} | Hq={heads_q} Hkv={heads_kv} d={head_dim} M={adapter_len} {dtype}, "
                     f"B x N = {tokens}", fontsize=10)
        fig.tight_layout()
        name = _slug(f"{path.stem}_{device}_{mode}_hq{heads_q}_hkv{heads_kv}_d{head_dim}_m{adapter_len}_{dtype}_t{tokens}")
        target = out_dir / f"{name}.png"
        fig.savefig(target, dpi=120)
        plt.close(fig)
        written.append(target)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="+", type=Path, help="result CSVs written by python -m benchmarks")
    parser.add_argument("--out", type=Path, help="directory of the PNGs (default: <csv dir>/plots)")
    args = parser.parse_args(argv)
    plt = load_pyplot()
    if plt is None:
        return 0
    for path in args.csv:
        if not path.exists():
            print(f"{path}: no such file, skipped")
            continue
        out_dir = args.out or path.parent / "plots"
        out_dir.mkdir(parents=True, exist_ok=True)
        written = plot_csv(path, out_dir, plt)
        print(f"{path}: {len(written)} figure(s) in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
