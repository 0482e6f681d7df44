"""One CE+CAT training step of SmolLM2-135M with prompts + LoRA q/k, in fp32 and under bf16 autocast.

    python -m benchmarks.real_model_step --data train3.jsonl [--threads 1] [--steps 2] [--precision no bf16]

The step is the one `causalattn train --model smollm2-135m --lora-rank 8 --mixed-precision {no,bf16}`
takes (its model loading, adapters, optimizer and autocast region), on the first --batch-size annotated
records of --data; each precision gets a fresh model with the same seed. Prints and returns one row per
step: seconds (wall, so a busy machine shows in it) and the step's CE, which tells how far bf16 moves
the loss.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import torch

import causalattn.hf as cah
from causalattn.data.annotations import check_annotations
from causalattn.data.batches import collate
from causalattn.data.jsonl import read_file
from causalattn.lab.training.command import load_tokenizer
from causalattn.lab.training.config import MIXED_PRECISION, TrainConfig
from causalattn.lab.training.loop import add_job_adapters, load_model, make_optimizer, training_precision
from causalattn.pretrained import resolve_pretrained


def measure(model_name: str, data: str, precisions: Sequence[str], steps: int, batch_size: int) -> list[dict]:
    path = resolve_pretrained(model_name)
    tokenizer = load_tokenizer(path)
    records, _ = check_annotations(read_file(data), tokenizer)
    batch = collate(records.examples[:batch_size], tokenizer)
    rows = []
    for precision in precisions:
        config = TrainConfig(model=model_name, mixed_precision=precision, lora_rank=8)
        torch.manual_seed(0)
        model = load_model(path, config, torch.device("cpu"))
        add_job_adapters(model, config)
        optimizer, scheduler = make_optimizer(model, config, total_steps=steps)
        model.train()
        for step in range(steps):
            start = time.perf_counter()
            with cah.collect(model) as stats, training_precision(config, torch.device("cpu")):
                out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                            supervision=batch.causal_mask, use_cache=False)
                loss = out.loss + stats.cat_loss(alpha=config.cat_alpha, kind=config.cat_kind)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            rows.append({"precision": precision, "step": step, "seconds": round(time.perf_counter() - start, 2),
                         "ce": round(float(out.loss.detach()), 4), "tokens": list(batch.input_ids.shape),
                         "threads": torch.get_num_threads(), "load_average": os.getloadavg()})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_model_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True, help="a CAT-format JSONL file (CAT's STG train3)")
    parser.add_argument("--precision", nargs="+", choices=MIXED_PRECISION, default=list(MIXED_PRECISION))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    measure(args.model, args.data, args.precision, args.steps, args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
