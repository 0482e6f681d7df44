"""The `causalattn` command line.

Each subcommand is a module exposing `add_arguments(parser)` and `run(args) -> int`, listed once in
`SUBCOMMANDS`: adding a command is one module and one line here.

    causalattn demo [--seq-len N] [--seed S] [--dtype float32|float64|bfloat16|float16]
    causalattn train [--model DIR] [--data stg|FILE.jsonl] [--eval-data NAME=FILE ...] [--runs ...] [...]
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from typing import Callable, NamedTuple, Optional, Sequence


class Subcommand(NamedTuple):
    module: str  # implements add_arguments(parser) and run(args) -> int
    help: str
    # A lighter module with the same add_arguments, so `--help` does not import the command's
    # dependencies: `causalattn train --help` took 8-9 s importing transformers through the trainer.
    arguments: Optional[str] = None


SUBCOMMANDS: dict[str, Subcommand] = {
    "demo": Subcommand("causalattn.lab.demo",
                       "run the reference op forward + backward on a random problem and print what it computes"),
    "train": Subcommand("causalattn.lab.training.command",
                        "train causal adapters (CE, CAT, XG) on a LLaMA-family model; default: a tiny embedded demo",
                        arguments="causalattn.lab.training.config"),
}


def _description(module: str, fallback: str) -> str:
    """The first paragraph of `module`'s docstring, read from its source without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return fallback
    with open(spec.origin, encoding="utf-8") as handle:
        doc = ast.get_docstring(ast.parse(handle.read()))
    return (doc or fallback).strip().split("\n\n")[0]


def _run_of(module: str) -> Callable[[argparse.Namespace], int]:
    """`module.run`, imported when the command runs."""
    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(module).run(args)
    return run


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
        child = sub.add_parser(name, help=spec.help, description=_description(spec.module, spec.help))
        importlib.import_module(spec.arguments or spec.module).add_arguments(child)
        child.set_defaults(handler=_run_of(spec.module))
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
