"""Accuracy by scoring candidate answers: for every example, each candidate answer ("High Risk" /
"Low Risk" for the STG; the targets of the training set for JSONL data) is appended to the prompt and
scored by the summed log-likelihood of its tokens; the best-scoring candidate is the prediction and
counts when it equals the example's target exactly. No sampling, so the number is deterministic.

Open answers (more distinct targets than candidates can be scored, e.g. MAWPS' 304 numbers) are
evaluated by generation instead: greedy decoding after the prompt, as many tokens as the longest
target plus one, and an exact match of the target's words with the first words generated
("84.0" matches "84.0 apples", not "84.05"). Also deterministic.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from causalattn.data.records import Example
from causalattn.data.batches import IGNORE_INDEX, collate
from causalattn.hf.contract import DOMAINS_KWARG, ROUTE_TOKENS_KWARG
from causalattn.hf.routed import find_router
from causalattn.hf.stats import collect
from causalattn.lab.training.batching import evaluation_shard
from causalattn.lab.training.distributed import DistContext


@torch.no_grad()
def score_candidates(model: nn.Module, tokenizer, examples: Sequence[Example], candidates: Sequence[str], *,
                     device: torch.device, max_length: Optional[int] = None) -> Tensor:
    """(len(examples), len(candidates)) summed log-likelihood of each candidate answer after each prompt."""
    variants = [dataclasses.replace(example, target=answer, important={})
                for example in examples for answer in candidates]
    batch = collate(variants, tokenizer, max_length=max_length).to(device)
    labels = batch.labels
    answer = labels != IGNORE_INDEX
    positions = torch.arange(labels.shape[1], device=device).expand_as(labels)
    # Only the rows that predict answer tokens need logits: position t predicts token t + 1.
    first = int(positions[answer].min()) - 1
    last = int(positions[answer].max()) - 1
    keep = torch.arange(first, last + 1, device=device)
    routing = {}
    if find_router(model) is not None:  # routed: route from the prompt (every candidate the same way)
        routing[ROUTE_TOKENS_KWARG] = batch.prompt_tokens()
        if batch.domains is not None:  # route="oracle" reads them
            routing[DOMAINS_KWARG] = batch.domains
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep,
                   use_cache=False, **routing).logits.float()
    targets = labels[:, keep + 1]
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    scores = (log_probs * (targets != IGNORE_INDEX)).sum(-1, dtype=torch.float64)
    return scores.view(len(examples), len(candidates))


def accuracy(model: nn.Module, tokenizer, examples: Sequence[Example], candidates: Sequence[str], *,
             context: DistContext, batch_size: int, max_length: Optional[int] = None,
             on_batch: Optional[Callable[[int], None]] = None) -> float:
    """Share of `examples` whose best-scoring candidate is their target, over all processes;
    `on_batch(n)` after each batch, with the examples all processes scored in it."""
    was_training = model.training
    model.eval()
    index = {answer: i for i, answer in enumerate(candidates)}
    counts = torch.zeros(2, dtype=torch.float64)  # correct, seen
    for chunk in evaluation_shard(examples, batch_size, context.rank, context.world_size):
        # An empty chunk still runs one forward: with a sharded model every process must join each one.
        scores = score_candidates(model, tokenizer, chunk or examples[:1], candidates,
                                  device=context.device, max_length=max_length)
        if on_batch is not None:
            on_batch(batch_size * context.world_size)
        if not chunk:
            continue
        predicted = scores.argmax(dim=1).cpu()
        truth = torch.tensor([index.get(example.target, -1) for example in chunk])
        counts += torch.tensor([float((predicted == truth).sum()), float(len(chunk))], dtype=torch.float64)
    model.train(was_training)
    correct, seen = context.sum(counts).tolist()
    return correct / seen


@torch.no_grad()
def routes_of(model: nn.Module, tokenizer, examples: Sequence[Example], *, context: DistContext, batch_size: int,
              max_length: Optional[int] = None) -> Tensor:
    """(n,) the route a routed model gives each of this process's share of `examples` (read from the prompt
    tokens, as in training), in `evaluation_shard` order; every process runs as many forwards."""
    was_training = model.training
    model.eval()
    found = []
    for chunk in evaluation_shard(examples, batch_size, context.rank, context.world_size):
        batch = collate(chunk or examples[:1], tokenizer, max_length=max_length).to(context.device)
        routing = {ROUTE_TOKENS_KWARG: batch.prompt_tokens()}
        if batch.domains is not None:
            routing[DOMAINS_KWARG] = batch.domains
        with collect(model) as stats:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1, use_cache=False,
                  **routing)
        if chunk:
            found.append(stats.route.index.cpu())
    model.train(was_training)
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)


def answer_matches(generated: str, target: str) -> bool:
    """Exact match of `target`'s words with the first words of `generated` (module docstring)."""
    words = target.split()
    return generated.split()[:len(words)] == words


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, examples: Sequence[Example], *, device: torch.device,
                     max_new_tokens: int, synced: bool = False) -> list[str]:
    """Greedy continuations of each example's prompt (`input + separator`), decoded."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    try:
        encoding = tokenizer([e.input + e.separator for e in examples], return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = side
    out = model.generate(**encoding, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)
    return tokenizer.batch_decode(out[:, encoding["input_ids"].shape[1]:], skip_special_tokens=True)


def generation_accuracy(model: nn.Module, tokenizer, examples: Sequence[Example], *, context: DistContext,
                        batch_size: int) -> float:
    """Share of `examples` whose greedy answer matches the target (`answer_matches`), over all processes."""
    was_training = model.training
    model.eval()
    longest = max(len(tokenizer(e.target, add_special_tokens=False)["input_ids"]) for e in examples)
    counts = torch.zeros(2, dtype=torch.float64)  # correct, seen
    for chunk in evaluation_shard(examples, batch_size, context.rank, context.world_size):
        answers = generate_answers(model, tokenizer, chunk or examples[:1], device=context.device,
                                   max_new_tokens=longest + 1, synced=context.distributed)
        if chunk:
            correct = sum(answer_matches(a, e.target) for a, e in zip(answers, chunk))
            counts += torch.tensor([float(correct), float(len(chunk))], dtype=torch.float64)
    model.train(was_training)
    correct, seen = context.sum(counts).tolist()
    return correct / seen
