"""The real-model experiment: SmolLM2-135M on CAT's official Spurious Token Game files, chosen on validation,
reported once on the official tests.

    python -m benchmarks.real_model --stg-dir DIR                 # select, then final, then the tables
    python -m benchmarks.real_model --stg-dir DIR --stage select  # only the recipe selection
    python -m benchmarks.real_model --stg-dir DIR --stage summary # rebuild the tables from what has finished
    python -m benchmarks.real_model --stg-dir DIR -- --mixed-precision bf16   # extra `causalattn train` flags

DIR holds CAT's spurious_token_game_train3.jsonl, _test3.jsonl and _ood3_2.jsonl (the STG folder of CAT's
public repository; they are not part of this project). The protocol:

1. a validation split (a quarter, seeded) is cut from train3 only; the rest is the selection's training set;
2. each recipe of RECIPES trains ce and ce+cat on that training set and is scored on the validation split;
   the recipe whose ce+cat validation accuracy is highest is chosen (the test files are not read);
3. the chosen recipe trains ce, ce+cat, ce+cat+xg and the random-cause control on all of train3 with
   --seeds seeds, scored once on test3 (iid) and ood3_2 (ood).

Every job is one `causalattn train` process per (recipe, seed), always with --resume: a stopped script
starts again where its jobs' last epoch checkpoints are, and a finished job is not run again. The tables
(`selection.md`, `final.md` and their JSON, under --results) are rebuilt from the runs' checkpoints
after every job, so whatever has finished is written down: per run the accuracy of each split, the
share of attention the answer rows put on the annotated causes (training batches of the last epoch;
the test files carry no annotations), training seconds, with mean +- standard error over seeds, plus
the majority-answer and zero-shot (every gate 0, LoRA B = 0) rows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from causalattn.checkpoint_files import newest_intact
from causalattn.lab.training.checkpoint import PROGRESS_NAME, checkpoint_root
from causalattn.lab.training.report import mean_and_error

FILES = {"train": "spurious_token_game_train3.jsonl", "iid": "spurious_token_game_test3.jsonl",
         "ood": "spurious_token_game_ood3_2.jsonl"}
MODEL = "smollm2-135m"
# The recipes compared: the prompts alone, + LoRA on q/k (CAT's lever, its lr 1e-3),
# + the q/k weights themselves, and LoRA q/k with the prompts and gates at CAT's lr as well (1e-3 instead of
# 0.02: in the first selection LoRA q/k's CE-only run ended at CE 4.5, above its start, a sign that 0.02 is
# too high once the base's attention moves too). Longer training was the fourth recipe first; at three
# times the cost of the others it did not fit a 2-core machine's session beside the final runs.
LORA_QK = ["--lora-rank", "8", "--lora-targets", "q,k", "--lora-lr", "1e-3"]
# LoRA q/k first: on a busy machine the recipe most likely to move the base's attention finishes first.
RECIPES = {"lora-qk": LORA_QK, "prompts": [], "train-qk": ["--train-qk"], "lora-qk-cat-lr": LORA_QK + ["--lr", "1e-3"]}
SELECT_RUNS = ("ce+cat", "ce")  # the criterion's run first
FINAL_RUNS = ("ce", "ce+cat", "ce+cat+xg", "ce+cat-random")
CRITERION_RUN = "ce+cat"  # the recipe is chosen for the method under test, on validation accuracy
VALIDATION_SHARE = 0.25   # CAT's own split_val.py keeps a quarter for validation


def newest_epoch_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest epoch checkpoint of a run that verifies against its manifest, or None."""
    root = checkpoint_root(run_dir)
    epochs = sorted((p for p in root.glob("epoch-*") if p.name[len("epoch-"):].isdigit()), reverse=True) \
        if root.is_dir() else []
    return newest_intact(epochs, lambda message: None)[0]


def split_validation(train_file: Path, directory: Path, seed: int) -> dict[str, Path]:
    """train3 cut into a seeded training part and a validation part (written once, then reused)."""
    paths = {"train": directory / "select-train.jsonl", "val": directory / "select-val.jsonl"}
    if all(path.is_file() for path in paths.values()):
        return paths
    lines = [line for line in train_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    cut = round(len(lines) * VALIDATION_SHARE)
    directory.mkdir(parents=True, exist_ok=True)
    for name, indices in (("val", order[:cut]), ("train", order[cut:])):
        paths[name].write_text("".join(lines[i] + "\n" for i in sorted(indices)), encoding="utf-8")
    return paths


def job_command(model: str, recipe: str, runs: Sequence[str], data: Path, evals: dict[str, Path], seed: int,
                output: Path, epochs: int, extra: Sequence[str]) -> list[str]:
    """The `causalattn train` command of one (recipe, seed) job; a recipe's --epochs overrides the default."""
    command = [sys.executable, "-m", "causalattn.lab.cli", "train", "--model", model, "--data", str(data),
               *[f"--eval-data={name}={path}" for name, path in evals.items()], "--runs", ",".join(runs),
               "--seed", str(seed), "--seeds", "1", "--output-dir", str(output), "--resume"]
    recipe_flags = RECIPES[recipe]
    if "--epochs" not in recipe_flags:
        command += ["--epochs", str(epochs)]
    return command + recipe_flags + list(extra)


def claim(output: Path) -> bool:
    """Take the job's lock file (its owner's pid), so that two instances of this script, e.g. one per
    recipe on a machine with idle cores, never train the same job; a lock whose process is gone is taken over."""
    lock = output / "job.lock"
    output.mkdir(parents=True, exist_ok=True)
    try:
        owner = int(lock.read_text())
        os.kill(owner, 0)
        return owner == os.getpid()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        lock.write_text(str(os.getpid()))
        return True


def run_job(command: list[str], output: Path, ledger: Path) -> bool:
    """Run one job unless its report exists or another instance runs it; its log goes to output/train.log;
    True when it finished."""
    if (output / "report.json").is_file():
        return True
    if not claim(output):
        print(f"real_model: {output} is being trained by another process; skipped", file=sys.stderr)
        return False
    entry = {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "load_average": os.getloadavg()}
    start = time.perf_counter()
    with open(output / "train.log", "a", encoding="utf-8") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    entry.update(exit_code=code, wall_seconds=round(time.perf_counter() - start, 1))
    (output / "job.lock").unlink()
    with open(ledger, "a", encoding="utf-8") as file:
        file.write(json.dumps(entry) + "\n")
    return code == 0


def run_rows(job_dir: Path) -> list[dict]:
    """One row per run of a job that has at least one epoch checkpoint, read from that checkpoint."""
    rows = []
    for run_dir in sorted(p for p in job_dir.iterdir() if p.is_dir()) if job_dir.is_dir() else []:
        checkpoint = newest_epoch_checkpoint(run_dir)
        if checkpoint is None:
            continue
        progress = json.loads((checkpoint / PROGRESS_NAME).read_text(encoding="utf-8"))
        last = progress["epoch"]
        history = [row for row in progress["history"] if row["epoch"] == last]
        rows.append({"run": progress["options"]["run"], "seed": progress["options"]["seed"], "epochs": last,
                     "of_epochs": progress["options"]["epochs"],
                     "accuracy": {r["split"]: r["accuracy"] for r in progress["accuracy"] if r["epoch"] == last},
                     "zero_shot": {r["split"]: r["accuracy"] for r in progress["accuracy"] if r["epoch"] == 0},
                     "zero_shot_cause_attn": progress["history"][0]["cause_attn"],
                     "cause_attn": sum(r["cause_attn"] for r in history) / len(history),
                     "ce": sum(r["ce"] for r in history) / len(history),
                     "train_seconds": progress["train_seconds"]})
    return rows


def majority(paths: dict[str, Path]) -> dict[str, float]:
    """Accuracy of always answering each file's most common target."""
    shares = {}
    for name, path in paths.items():
        targets = [json.loads(line)["target"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        shares[name] = max(targets.count(t) for t in set(targets)) / len(targets)
    return shares


def aggregate(rows: list[dict], splits: Sequence[str]) -> dict:
    """Mean +- SE over seeds of each split's accuracy, the cause-attention share and the training seconds."""
    out = {"seeds": sorted(row["seed"] for row in rows)}
    for key, values in [*((s, [r["accuracy"].get(s) for r in rows]) for s in splits),
                        ("cause_attn", [r["cause_attn"] for r in rows]), ("ce", [r["ce"] for r in rows]),
                        ("train_seconds", [r["train_seconds"] for r in rows])]:
        values = [v for v in values if v is not None]
        out[key] = dict(zip(("mean", "se"), mean_and_error(values))) if values else None
    return out


def cell(value: Optional[dict], digits: int = 3) -> str:
    if value is None:
        return "-"
    se = value["se"]
    return f"{value['mean']:.{digits}f}" + ("" if se != se else f" ± {se:.{digits}f}")


def table(title: str, groups: dict[str, list[dict]], splits: Sequence[str], majority_row: dict[str, float]) -> str:
    """A Markdown table: the majority row, the zero-shot row (from any run's epoch 0), then each group."""
    head = f"| run | seeds | {' | '.join(splits)} | cause attn | CE (last epoch) | train s/run |"
    lines = [f"## {title}", "", head, "|" + "---|" * (head.count("|") - 1),
             f"| majority answer | | {' | '.join(f'{majority_row[s]:.3f}' for s in splits)} | | | |"]
    every = [row for rows in groups.values() for row in rows]
    if every:
        zero = every[0]
        shots = " | ".join(f"{zero['zero_shot'].get(s, float('nan')):.3f}" for s in splits)
        lines.append(f"| zero-shot (gates 0) | | {shots} | {zero['zero_shot_cause_attn']:.3f} | | |")
    for name, rows in groups.items():
        if not rows:
            lines.append(f"| {name} | 0 (not finished) | {' | '.join('-' for _ in splits)} | - | - | - |")
            continue
        stats = aggregate(rows, splits)
        partial = "" if all(r["epochs"] == r["of_epochs"] for r in rows) else " (partial: not every epoch)"
        lines.append(f"| {name}{partial} | {len(rows)} | {' | '.join(cell(stats[s]) for s in splits)} | "
                     f"{cell(stats['cause_attn'])} | {cell(stats['ce'])} | {cell(stats['train_seconds'], 0)} |")
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import peft
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_now": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "threads": torch.get_num_threads()}


def summarize(work: Path, results: Path, stg: dict[str, Path], split_paths: dict[str, Path]) -> Optional[str]:
    """Rebuild the selection and final tables from the checkpoints; returns the chosen recipe, if any."""
    results.mkdir(parents=True, exist_ok=True)
    selection = {recipe: [row for seed_dir in sorted((work / "select" / recipe).glob("seed-*"))
                          for row in run_rows(seed_dir)] for recipe in RECIPES}
    groups = {f"{recipe}: {run}": [r for r in rows if r["run"] == run]
              for recipe, rows in selection.items() for run in SELECT_RUNS}
    scores = {recipe: aggregate([r for r in rows if r["run"] == CRITERION_RUN and r["epochs"] == r["of_epochs"]],
                                ["val"])["val"] for recipe, rows in selection.items()}
    finished = {recipe: score["mean"] for recipe, score in scores.items() if score is not None}
    complete = len(finished) == len(RECIPES)
    chosen = max(finished, key=finished.get) if complete else None
    text = table("Recipe selection (validation split of train3)", groups, ["val"], majority({"val": split_paths["val"]}))
    text += (f"\nChosen on validation ({CRITERION_RUN} accuracy): **{chosen}**\n" if chosen else
             f"\nRecipes whose {CRITERION_RUN} run has finished: {', '.join(sorted(finished)) or 'none'} (of "
             f"{', '.join(RECIPES)}); no recipe is chosen until every one has.\n")
    final_dir = work / "final"
    recipe_file = final_dir / "recipe"
    final_recipe = recipe_file.read_text().strip() if recipe_file.is_file() else None
    final_rows = [row for seed_dir in sorted(final_dir.glob("seed-*")) for row in run_rows(seed_dir)]
    final_groups = {run: [r for r in final_rows if r["run"] == run] for run in FINAL_RUNS}
    final_text = table(f"Final runs (recipe {final_recipe or '-'}; train3 -> test3 iid, ood3_2 ood)", final_groups,
                       ["iid", "ood"], majority({"iid": stg["iid"], "ood": stg["ood"]}))
    (results / "selection.md").write_text(text, encoding="utf-8")
    (results / "final.md").write_text(final_text, encoding="utf-8")
    payload = {"selection": selection, "scores": scores, "chosen": chosen, "final_recipe": final_recipe,
               "final": final_rows, "recipes": RECIPES, "environment": environment()}
    (results / "results.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return chosen


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stg-dir", required=True, type=Path, help="folder with CAT's three STG files")
    parser.add_argument("--model", default=MODEL, help=f"the base (default {MODEL})")
    parser.add_argument("--stage", choices=("all", "select", "final", "summary"), default="all")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/real_model"), help="checkpoints and logs")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/real_model"), help="the tables")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of each final run (default 3)")
    parser.add_argument("--select-seeds", type=int, default=1, help="seeds of each selection run (default 1)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of a recipe that does not set its own")
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"the recipes this instance trains in the selection (default {','.join(RECIPES)})")
    parser.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                        help="the final runs' recipe (default: the one chosen on validation)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the validation split (default 0)")
    args = parser.parse_args(argv)
    stg = {name: args.stg_dir / file for name, file in FILES.items()}
    missing = [str(path) for path in stg.values() if not path.is_file()]
    if missing:
        parser.error(f"--stg-dir: missing {', '.join(missing)}")
    work, ledger = args.work_dir, args.work_dir / "jobs.jsonl"
    split = split_validation(stg["train"], work / "data", args.split_seed)
    work.mkdir(parents=True, exist_ok=True)
    if args.stage != "summary":  # the flags the runs train with; a summary trains nothing and keeps them
        (args.results / "extra_flags.txt").parent.mkdir(parents=True, exist_ok=True)
        (args.results / "extra_flags.txt").write_text(" ".join(extra) + "\n", encoding="utf-8")
    chosen = summarize(work, args.results, stg, split)
    if args.stage in ("all", "select"):
        for recipe in args.recipes.split(","):
            if recipe not in RECIPES:
                parser.error(f"--recipes: {recipe!r} is not one of {', '.join(RECIPES)}")
            for seed in range(args.select_seeds):
                output = work / "select" / recipe / f"seed-{seed}"
                run_job(job_command(args.model, recipe, SELECT_RUNS, split["train"], {"val": split["val"]}, seed, output,
                                    args.epochs, extra), output, ledger)
                chosen = summarize(work, args.results, stg, split)
    if args.stage in ("all", "final"):
        recipe = args.recipe or chosen
        if recipe is None:
            print("real_model: no recipe chosen on validation yet (run --stage select, or pass --recipe)",
                  file=sys.stderr)
            return 1
        recipe_file = work / "final" / "recipe"
        if recipe_file.is_file() and recipe_file.read_text().strip() != recipe:
            print(f"real_model: {work / 'final'} holds runs of recipe {recipe_file.read_text().strip()}; use another "
                  "--work-dir for another recipe", file=sys.stderr)
            return 1
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        recipe_file.write_text(recipe + "\n", encoding="utf-8")
        for seed in range(args.seeds):
            output = work / "final" / f"seed-{seed}"
            run_job(job_command(args.model, recipe, FINAL_RUNS, stg["train"], {"iid": stg["iid"], "ood": stg["ood"]}, seed,
                                output, args.epochs, extra), output, ledger)
            summarize(work, args.results, stg, split)
    summarize(work, args.results, stg, split)
    print((args.results / "selection.md").read_text() + "\n" + (args.results / "final.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
