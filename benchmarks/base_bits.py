"""Whether a build switch changes the embedded base at all: a short build (the default job's model, the
first STEPS pre-training steps) under this process's environment and the given switches, and the hash
of its weights. Equal hashes: the switch does not change a bit of the base on this machine.

    python -m benchmarks.base_bits                       # the default build
    python -m benchmarks.base_bits --threads 2           # --base-threads 2
    python -m benchmarks.base_bits --no-onednn           # --no-base-onednn
    python -m benchmarks.base_bits --steps 0 --threads 2 # the job's whole build (its weights_sha256)
    ATEN_CPU_CAPABILITY=avx2 python -m benchmarks.base_bits
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

STEPS = 20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-onednn", action="store_true")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"pre-training steps to build (default {STEPS}; 0: the job's whole build, rounds included)")
    args = parser.parse_args(argv)
    from causalattn.lab.training import tiny

    torch.set_num_threads(1)
    settings = tiny.settings_for("shortcut", seed=args.seed, threads=args.threads, onednn=not args.no_onednn)
    if args.steps:
        settings = dataclasses.replace(settings, examples=args.steps * settings.batch_size, max_rounds=1)
    path = tiny.ensure_tiny_base(settings, Path(tempfile.mkdtemp()), show_progress=False, log=lambda m: None)
    record = tiny.read_record(path)
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR") if k in os.environ}
    print(json.dumps({"steps": args.steps or "whole build", "seed": args.seed, "threads": args.threads,
                      "onednn": not args.no_onednn, "env": env, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "weights_sha256": record["weights_sha256"], "final_lm_loss": record["final_lm_loss"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
