"""The `causalattn` command line.

Each subcommand is a module exposing `add_arguments(parser)` and `run(args) -> int`, listed once in
`SUBCOMMANDS`: adding a command is one module and one line here.

    causalattn demo [--seq-len N] [--seed S] [--dtype float32|float64|bfloat16|float16]
    causalattn train [--model DIR] [--data stg|FILE.jsonl] [--runs ce,ce+cat,ce+cat+xg] [...]
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple, Optional, Sequence


class Subcommand(NamedTuple):
    module: str  # implements add_arguments(parser) and run(args) -> int
    help: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "demo": Subcommand("causalattn.demo",
                       "run the reference op forward + backward on a random problem and print what it computes"),
    "train": Subcommand("causalattn.training.command",
                        "train causal adapters (CE, CAT, XG) on a LLaMA-family model; default: a tiny embedded demo"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of `SUBCOMMANDS`."""
    from causalattn import __version__

    parser = argparse.ArgumentParser(
        prog="causalattn",
        description="Fused attention for zero-init gated adapters, CAT causal-mask supervision and the XG regulariser.",
    )
    parser.add_argument("--version", action="version", version=f"causalattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, spec in SUBCOMMANDS.items():
        module = importlib.import_module(spec.module)
        child = sub.add_parser(name, help=spec.help, description=(module.__doc__ or spec.help).strip().split("\n\n")[0])
        module.add_arguments(child)
        child.set_defaults(handler=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: `causalattn COMMAND [options]`; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
