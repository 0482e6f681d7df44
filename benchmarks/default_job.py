"""Keep a `causalattn train` job's numbers under benchmarks/results: the pooled table with each base's
mean, the bases' build records and the machine (JSON), and one row per run (CSV).

    python -m benchmarks.default_job RUN_DIR/report.json LABEL   # -> results/default_job_LABEL.{json,csv}
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
METRICS = ("acc_iid", "acc_flipped", "acc_independent", "cause_attn")
# options a report leaves out when they have their every-layer, head-mean defaults (older reports lack them)
DEFAULTS = {"cat_heads": "mean", "cat_layers": []}


def compact(report: dict, label: str) -> dict:
    """The report's table (mean, standard error, per-base means), bases and environment."""
    summary = {run: {key: {k: entry[key][k] for k in ("mean", "se", "base_means") if k in entry[key]}
                     for key in METRICS if key in entry} for run, entry in report["summary"].items()}
    bases = report["model"].get("bases", [report["model"]])
    keep = ("seed", "reading_accuracy", "weights_sha256", "build_seconds", "base_lm_loss")
    config = report["config"]
    return {"label": label, "wall_seconds": report["wall_seconds"], "environment": report["environment"],
            "options": {k: config.get(k, DEFAULTS.get(k)) for k in (
                "runs", "seed", "seeds", "bases", "base_seed", "base_threads", "base_onednn", "cat_kind", "cat_decay",
                "cat_weight", "cat_rows", "cat_heads", "cat_layers", "cue_agreement", "train_examples",
                "eval_examples", "epochs")},
            "bases": [{k: base.get(k) for k in keep} | {"reading_by_round": base.get("reading_by_round")}
                      for base in bases],
            "error_over": "base means (each the mean over its seeds)" if len(bases) > 1 else "seeds",
            "summary": summary}


def main(argv: list[str]) -> int:
    report_path, label = Path(argv[0]), argv[1]
    report = json.loads(report_path.read_text(encoding="utf-8"))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"default_job_{label}.json").write_text(json.dumps(compact(report, label), indent=1) + "\n",
                                                      encoding="utf-8")
    with open(RESULTS / f"default_job_{label}.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "base", "seed", "run", "iid", "flipped", "independent", "cause_attn"])
        for run in report["runs"]:
            accuracy = run["final_accuracy"]
            writer.writerow([label, run.get("base"), run["seed"], run["name"],
                             *(f"{accuracy.get(s, float('nan')):.4f}" for s in ("iid", "flipped", "independent")),
                             f"{run['history'][-1]['cause_attn']:.4f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
