"""Figures of a training run: loss curves, accuracy per epoch, and where the answer attends.

`plot_attention` shows, for a few examples, the sequence-attention row of the position that predicts
the first answer token (the softmax P that CAT supervises, averaged over layers and heads), with the
annotated cause tokens marked, so a run's "before" and "after" figures show whether attention moved
onto the causes. The rows come from a probe attention function registered beside "causalattn": it
runs the normal fused op (adapters included) and also returns P for these short examples.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from causalattn.data.batches import IGNORE_INDEX, collate
from causalattn.hf import DOMAINS_KWARG, ROUTE_TOKENS_KWARG, find_router
from causalattn.data.records import Example

PROBE_IMPLEMENTATION = "causalattn-probe"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history_rows: Sequence[dict], accuracy_rows: Sequence[dict], path: str | Path) -> Path:
    """Loss per step (total and CE) of every run and seed, and accuracy per epoch and split; one PNG.
    One color per run; with several seeds every seed is its own thin line, so the spread shows."""
    plt = _pyplot()
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_run = defaultdict(list)
    for row in history_rows:
        by_run[(row["run"], row.get("seed", 0))].append(row)
    runs = list(dict.fromkeys(run for run, _ in by_run))
    labelled: set = set()
    for (run, seed), rows in by_run.items():
        color = f"C{runs.index(run)}"
        steps = [r["step"] for r in rows]
        first = run not in labelled
        labelled.add(run)
        loss_axes.plot(steps, [r["loss"] for r in rows], color=color, linewidth=0.8,
                       label=f"{run}: total" if first else None)
        loss_axes.plot(steps, [r["ce"] for r in rows], color=color, linewidth=0.8, linestyle=":",
                       label=f"{run}: CE" if first else None)
    loss_axes.set(xlabel="optimizer step", ylabel="loss", title="training loss (one line per seed)")
    loss_axes.legend(fontsize=7)
    curves = defaultdict(list)
    for row in accuracy_rows:
        curves[(row["run"], row.get("seed", 0), row["split"])].append((row["epoch"], row["accuracy"]))
    runs += [run for run, _, _ in curves if run not in runs]
    # one line style per evaluation split, whatever the splits are named (iid/ood, or the --eval-data names)
    styles = dict(zip(dict.fromkeys(split for _, _, split in curves), ("-", "--", ":", "-.") * 4))
    labelled = set()
    for (run, seed, split), points in curves.items():  # one line per seed, labelled once per run and split
        points.sort()
        accuracy_axes.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", markersize=3,
                           linewidth=0.8, color=f"C{runs.index(run)}", linestyle=styles[split],
                           label=f"{run} ({split})" if (run, split) not in labelled else None)
        labelled.add((run, split))
    names = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}
    title = "answer accuracy: " + ", ".join(f"{split} {names[style]}" for split, style in styles.items())
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy (%)", title=title + "; one line per seed", ylim=(0, 100))
    if curves:  # no evaluation files: no accuracy lines to name
        accuracy_axes.legend(fontsize=6)
    figure.tight_layout()
    return _save(figure, path, plt)


def _save(figure, path: str | Path, plt) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)  # a reader never sees half a PNG
    return path


# ------------------------------------------------------------------------------ attention rows
def _probe_attention(records: list):
    from causalattn.hf.attention import attention_forward

    def probe(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
              scaling: Optional[float] = None, **kwargs):
        result = attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        group = query.shape[1] // key.shape[1]
        scores = query.float() @ key.float().repeat_interleave(group, dim=1).transpose(-1, -2) * scaling
        n_q, n_k = scores.shape[-2:]
        visible = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(n_k - n_q)
        if attention_mask is not None:
            visible = visible & attention_mask[:, None, None, :]
        records.append(torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).mean(1).detach().cpu())
        return result

    probe.causalattn_adapter_aware = True  # it runs the fused op, adapters included (causalattn.hf.guards)
    return probe


@contextmanager
def _recording_attention(model: nn.Module) -> Iterator[list]:
    """Within the block, `model` runs through the probe and each layer appends its (B, N, N) head-mean P."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from causalattn.hf.attention import key_padding_mask
    from causalattn.hf.contract import IMPLEMENTATION

    records: list = []
    AttentionInterface.register(PROBE_IMPLEMENTATION, _probe_attention(records))
    AttentionMaskInterface.register(PROBE_IMPLEMENTATION, key_padding_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROBE_IMPLEMENTATION)
    try:
        yield records
    finally:
        model.set_attn_implementation(previous if previous else IMPLEMENTATION)


@torch.no_grad()
def answer_attention(model: nn.Module, tokenizer, example: Example) -> tuple[list[str], Tensor, Tensor]:
    """(tokens, attention row (N,), cause flags (N,)) for the position predicting the first answer token."""
    batch = collate([example], tokenizer).to(next(model.parameters()).device)
    routing = {}
    if find_router(model) is not None:  # a routed model routes from the prompt, an oracle from the domain id
        routing[ROUTE_TOKENS_KWARG] = batch.prompt_tokens()
        if batch.domains is not None:
            routing[DOMAINS_KWARG] = batch.domains
    with _recording_attention(model) as records:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **routing)
    row = int((batch.labels[0] != IGNORE_INDEX).nonzero()[0]) - 1
    attention = torch.stack([layer[0, row] for layer in records]).mean(0)
    causes = batch.causal_mask.unpack_rows(row, row + 1)[0, 0].cpu()
    tokens = [tokenizer.decode([t]) for t in batch.input_ids[0].tolist()]
    return tokens, attention, causes


def plot_attention(model: nn.Module, tokenizer, examples: Sequence[Example], path: str | Path, title: str) -> Path:
    """One strip per example: attention of the answer-predicting row over the prompt, causes in red."""
    plt = _pyplot()
    figure, axes = plt.subplots(len(examples), 1, figsize=(14, 1.9 * len(examples)), squeeze=False)
    was_training = model.training
    model.eval()
    try:
        for axis, example in zip(axes[:, 0], examples):
            tokens, attention, causes = answer_attention(model, tokenizer, example)
            shown = len(tokens) - int((attention == 0).flip(0).cumprod(0).sum())  # drop keys after the row
            axis.bar(range(shown), attention[:shown].numpy(),
                     color=["tab:red" if c else "tab:gray" for c in causes[:shown].tolist()])
            axis.set_xticks(range(shown), [t.replace("\n", "\\n") for t in tokens[:shown]], rotation=90, fontsize=6)
            mass = float(attention[causes].sum())
            axis.set_title(f"answer {example.target!r}: attention on causes (red) = {mass:.2f}", fontsize=8)
            axis.tick_params(axis="y", labelsize=6)
    finally:
        model.train(was_training)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path, plt)
