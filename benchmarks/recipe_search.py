"""Validation runs that chose the default job's recipe (task, base recipe, losses).

Builds tiny bases with the given base seeds (never the job's) and trains CE, CE+CAT and the control on
data seeds the job does not report, then prints each base x seed's final accuracies as JSON lines.

    python -m benchmarks.recipe_search --base-seeds 501,502 --seeds 100,101 \
        --base '{"examples": 32000}' --train '{"cat_kind": "mass"}' --out results.jsonl

`--probe-cue` (shortcut task) also scores each run, and the base before training, on the flipped test with
the cue word dropped and with it made to agree (`causalattn.lab.tasks.shortcut.probe_cue`): how well the
model reads the causes alone, the ceiling of its flipped accuracy.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-seeds", required=True)
    parser.add_argument("--seeds", required=True)
    parser.add_argument("--base", default="{}", help="TinyBaseSettings overrides (JSON)")
    parser.add_argument("--train", default="{}", help="TrainConfig overrides (JSON)")
    parser.add_argument("--runs", default="ce,ce+cat,ce+cat-random")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", required=True)
    parser.add_argument("--probe-cue", action="store_true",
                        help="also score the flipped test without the cue and with an agreeing cue (shortcut task)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="keep the built bases here, so that recipes differing only in training reuse them")
    args = parser.parse_args(argv)
    if args.probe_cue and json.loads(args.train).get("task", "shortcut") != "shortcut":
        parser.error("--probe-cue: probes the shortcut task's cue; --train sets another task")
    torch.set_num_threads(1)

    from transformers.utils import logging as hf_logging

    from causalattn.lab.training import tiny
    from causalattn.lab.training.batching import load_data
    from causalattn.lab.training.command import load_tokenizer
    from causalattn.lab.training.config import RunSpec, TrainConfig
    from causalattn.lab.tasks import shortcut
    from causalattn.lab.training.distributed import setup
    from causalattn.lab.training.evaluate import accuracy
    from causalattn.lab.training.loop import Job, Trainer

    hf_logging.disable_progress_bar()
    base_overrides, train_overrides = json.loads(args.base), json.loads(args.train)
    context = setup("cpu")
    runs_root = Path(tempfile.mkdtemp(prefix="recipe-"))  # each search its own: searches may share bases
    root = args.cache_dir or runs_root
    for base_seed in map(int, args.base_seeds.split(",")):
        settings = dataclasses.replace(tiny.settings_for(train_overrides.get("task", "shortcut")),
                                       seed=base_seed, **base_overrides)
        start = time.perf_counter()
        path = tiny.ensure_tiny_base(settings, root, show_progress=False, log=lambda m: None)
        built = time.perf_counter() - start
        tokenizer = load_tokenizer(path)
        for seed in map(int, args.seeds.split(",")):
            config = TrainConfig(model=str(path), train_qk=True, cat_decay=0.0, seeds=1, seed=seed, quiet=True,
                                 threads=1, runs=tuple(RunSpec.parse(r) for r in args.runs.split(",")),
                                 **{k: v for k, v in train_overrides.items() if k != "task"},
                                 **({"task": train_overrides["task"]} if "task" in train_overrides else {}))
            data = load_data(config, None, tokenizer, lambda m: None)
            out = runs_root / f"b{base_seed}-s{seed}"
            job = Job(config, path, tokenizer, data, context, out, lambda m: None, out)
            probes = {f"flipped_{probe.replace('-', '_')}": [shortcut.probe_cue(e, probe) for e in data.evals["flipped"]]
                      for probe in shortcut.CUE_PROBES} if args.probe_cue else {}

            def probed(model) -> dict:
                return {name: accuracy(model, tokenizer, examples, data.candidates, context=context,
                                       batch_size=config.eval_batch_size) for name, examples in probes.items()}

            row = {"label": args.label, "base": base_overrides, "train": train_overrides, "base_seed": base_seed,
                   "seed": seed, "base_seconds": built}
            before_probes: dict = {}
            for spec in config.runs:
                start = time.perf_counter()
                result, model = Trainer(job, spec).run(
                    before_training=None if before_probes or not probes else lambda m: before_probes.update(probed(m)))
                row[spec.name] = {**result.final_accuracy(),
                                  "cause_attn": result.history[-1]["cause_attn"],
                                  "seconds": time.perf_counter() - start, **probed(model)}
                row["before"] = {**{r["split"]: r["accuracy"] for r in result.accuracy if r["epoch"] == 0},
                                 **before_probes}
            with open(args.out, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
