"""CE + CAT + XG adapter training with `CausalTrainer`, launched by Accelerate on one or many processes.

    python examples/accelerate_trainer.py --model BASE --data train.jsonl --output out
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_trainer.py --model BASE ...   # DDP
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_trainer.py --cpu ...  # DDP on CPUs (gloo)
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/accelerate_trainer.py ...

On CPUs Accelerate's `--cpu` flag starts one process (its multi-CPU mode expects mpirun); its torch
launcher (`--multi_gpu`) starts them all, and the script's `--cpu` (TrainingArguments(use_cpu=True))
makes each one a gloo CPU process.

BASE is a local Hugging Face checkpoint (model + tokenizer); the data is CAT's JSONL (`input`, `target`,
`important`). The global batch is `processes x --batch-size x --grad-accum`: 2 processes x 2 equal
1 process x 2 x 2 accumulation steps, the same micro-batches in the same order, so the two runs train
the same adapters up to the rounding of the gradient sum. The main process writes the adapters
(`causalattn_adapter.json` + `adapter_model.safetensors`) and the log history (`log_history.json`) to
--output.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed

import causalattn.hf as cah


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local Hugging Face checkpoint: model and tokenizer")
    parser.add_argument("--data", required=True, help="CAT-format JSONL")
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch-size", type=int, default=2, help="per process and micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--adapter-len", type=int, default=4)
    parser.add_argument("--adapter-layers", type=int, default=None)
    parser.add_argument("--xg-weight", type=float, default=1.0)
    parser.add_argument("--backend", default="auto", help="causalattn backend: auto, triton or reference")
    parser.add_argument("--cpu", action="store_true", help="train on CPUs (gloo between processes)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> cah.CausalTrainer:
    args = parse_args(argv)
    set_seed(0)  # the same prompts on every process (DDP would broadcast rank 0's anyway; FSDP shards them)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="causalattn")
    cah.add_adapters(model, cah.AdapterConfig(length=args.adapter_len, layers=args.adapter_layers))
    cah.set_backend(model, args.backend)
    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    training = TrainingArguments(
        output_dir=args.output, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.max_steps, learning_rate=args.lr, logging_steps=1, save_strategy="no", report_to=[],
        seed=0, dataloader_num_workers=0, disable_tqdm=True, use_cpu=args.cpu)
    trainer = cah.CausalTrainer(model=model, args=training, train_dataset=rows, processing_class=tokenizer,
                                cat_weight=1.0, xg_weight=args.xg_weight)
    trainer.train()
    trainer.save_model(args.output)  # the adapters only (every process takes part; the main one writes)
    if trainer.accelerator.is_main_process:
        (Path(args.output) / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    # Leave the process group together: a process tearing its connections down while another still writes
    # can abort at exit after a finished run.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return trainer


if __name__ == "__main__":
    main()
