"""The embedded default model: a tiny LLaMA that knows the Spurious Token Game's format but not its rule.

`causalattn train` without `--model` needs a pretrained causal LM and no hub can be reached, so one is
made here, on the CPU, in about a minute:

1. a byte-level BPE tokenizer trained in-process (`tokenizers`) on STG text;
2. a small `LlamaConfig` model (grouped-query attention, tied embeddings);
3. a short language-model training on STG text whose feature values are all independent. For the
   cancer-risk task the answers are drawn at random: the model learns the format (names, values, the
   question, that the answer is "High Risk" or "Low Risk"). For the shortcut task (the default) it also
   learns to read fields: most texts ask "Is the overall risk high or low?", answered by the majority
   of all fields, as a pretrained LLM knows how to read a record; the cancer question itself only
   comes with random answers. Neither base knows the task's rule or its spurious correlation: which
   fields the cancer question is about is left for the adapter training to learn, or not.

The result is an ordinary Hugging Face checkpoint directory (model + tokenizer) cached under
`$CAUSALATTN_CACHE` (default `$XDG_CACHE_HOME/causalattn`, else `~/.cache/causalattn`) in a folder
named by a hash of `TinyBaseSettings`, so changed settings build a new one. It is built in a
temporary folder beside and renamed into place, so an interrupted build never leaves a half checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from causalattn.lab.tasks import dialects, shortcut, stg

# Bump when the build recipe changes in a way the settings do not show, so old caches are not reused.
RECIPE_VERSION = 3
SETTINGS_NAME = "tiny_base.json"
PAD, BOS = "<pad>", "<s>"
ANSWER = "Answer:"


@dataclass(frozen=True)
class TinyBaseSettings:
    """Everything the tiny base depends on (its cache key)."""

    vocab_size: int = 400
    hidden_size: int = 128
    intermediate_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 128
    examples: int = 16000  # base-training examples, each seen once
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    seed: int = 1234  # differs from the adapter job's default seed: base text and job data stay distinct
    task: str = "shortcut"  # whose text format the base learns (see `causalattn.lab.training.config.TASKS`)
    # shortcut and dialects tasks: share of texts asking the cancer question (with a random answer, so the base knows
    # its format but not its rule); the rest ask the overall question, whose answer the base must learn
    cancer_share: float = 0.2
    # shortcut task: "overall" answers the cancer question too by the majority of all fields, so the base's
    # read-out serves both questions; "random" gives it random answers (its format only)
    cancer_answer: str = "overall"
    # shortcut task: pre-training rounds (each `examples` fresh texts, a fresh warm-up + cosine) until the
    # base answers its own question right on `reading_target` of fresh records, at most `max_rounds`. One
    # round of 1,000 steps left some seeds unable to read (50-58 % on the validation bases 501 and 503,
    # 82-96 % on others), and the CAT runs on those bases collapsed to one answer.
    reading_target: float = 0.9
    max_rounds: int = 4
    # How the build runs (the job sets one torch thread; 2 threads or torch's own kernels instead of
    # oneDNN's sum in another order and give another base: stand-ins for another machine)
    threads: int = 1
    onednn: bool = True

    def key(self) -> str:
        """A short hash of the settings and the recipe version: the cache folder's name."""
        payload = json.dumps({"recipe": RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# The shortcut task's base trains 2,000 steps at a third of the learning rate. At 3e-3 for 1,000 steps,
# rounds included, the validation bases 501-505 read their own question right on 0.73-0.975 (a plateau
# that more rounds, a longer round or a wider model did not leave); at 1e-3 for 2,000 steps all five
# read it right on 100 % after one round, so every seed builds the same reader and CE takes the cue on
# every base alike (flipped 0.23-0.32) (docs/default-job.md "The fourth round").
SHORTCUT_BASE = {"lr": 1e-3, "examples": 32000}


def settings_for(task: str, **build: object) -> TinyBaseSettings:
    """The embedded base of `task` (`build`: seed, threads, onednn): the dialects task writes every field
    twice (two dialects), so its tokenizer needs 512 entries to keep each of its 84 field words one token
    (400 splits 55 of them); the shortcut task's base trains as SHORTCUT_BASE says."""
    task_settings = SHORTCUT_BASE if task == "shortcut" else {}
    return TinyBaseSettings(task=task, vocab_size=512 if task == "dialects" else TinyBaseSettings.vocab_size,
                            **{**task_settings, **build})


def cache_root() -> Path:
    """Where causalattn caches what it builds: $CAUSALATTN_CACHE, $XDG_CACHE_HOME/causalattn or ~/.cache/causalattn."""
    if os.environ.get("CAUSALATTN_CACHE"):
        return Path(os.environ["CAUSALATTN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "causalattn"


def cached_path(settings: TinyBaseSettings, root: Optional[Path] = None) -> Path:
    return (root if root is not None else cache_root()) / f"tiny-llama-{settings.key()}"


def base_texts(settings: TinyBaseSettings, round_index: int = 0) -> list[str]:
    """The task's text with independent feature values: for cancer-risk with random answers (the format,
    not the rule); for the shortcut and dialects tasks their `base_text` (reading fields, but not which
    ones matter). Each pre-training round draws its own texts."""
    rng = random.Random(settings.seed if round_index == 0 else f"{settings.seed}-round-{round_index}")
    if settings.task == "shortcut":
        return [shortcut.base_text(rng, settings.cancer_share, settings.cancer_answer)
                for _ in range(settings.examples)]
    if settings.task == "dialects":
        return [dialects.base_text(rng, settings.cancer_share) for _ in range(settings.examples)]
    examples = stg.generate(settings.examples, seed=settings.seed, ood=True)
    return [f"{example.input} {rng.choice(stg.LABELS)}" for example in examples]


def train_tokenizer(texts: list[str], vocab_size: int, *, split_on_spaces_only: bool = False):
    """A byte-level BPE trained on `texts`, with a BOS template like LLaMA's, as a fast HF tokenizer.

    By default words are pre-split GPT-2's way (letters, digits and punctuation apart), so
    `Smoking: 7` is three tokens. `split_on_spaces_only` keeps every space-delimited word whole for
    the merges, so a word seen often enough (each `Smoking=7` of the shortcut task) becomes one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    if split_on_spaces_only:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r" ?[^ ]+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, pad_token=PAD, padding_side="right")


def build_model(settings: TinyBaseSettings, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.hidden_size, intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.layers, num_attention_heads=settings.heads, num_key_value_heads=settings.kv_heads,
        max_position_embeddings=settings.max_positions, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=None)
    return LlamaForCausalLM(config)


def pretrain(model, tokenizer, texts: list[str], settings: TinyBaseSettings,
             progress: Callable[[int, int, float], None]) -> float:
    """Language-model training on `texts` (one pass, AdamW, warm-up + cosine): every token, or only the
    answer's for the shortcut task (the text after "Answer:"); returns
    the last step's loss. `progress(step, steps, loss)` is called after each step."""
    from transformers import get_cosine_schedule_with_warmup

    steps = len(texts) // settings.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, steps)
    model.train()
    loss = math.nan
    for step in range(steps):
        chunk = texts[step * settings.batch_size:(step + 1) * settings.batch_size]
        batch = tokenizer(chunk, padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        if settings.task == "shortcut":
            # Only the answer: the record words are uniform draws with nothing to learn, and with every
            # token in the loss the read-out was not learned in 1,000 steps (answer loss stayed ln 2).
            for row, text in enumerate(chunk):
                prompt = text[:text.index(ANSWER) + len(ANSWER)]
                labels[row, :len(tokenizer(prompt)["input_ids"])] = -100
        # The dialects base keeps every token in the loss: on one seed its CE run reached 0.94 iid / 0.54
        # flipped that way, 0.80 / 0.42 with the answers only (its two surfaces are worth learning).
        out = model(**batch, labels=labels, use_cache=False)
        out.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.item()
        progress(step + 1, steps, loss)
    return loss


@contextlib.contextmanager
def build_conditions(settings: TinyBaseSettings) -> Iterator[None]:
    """Torch's thread count and oneDNN switch as `settings` asks, restored afterwards."""
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(settings.threads)
    torch.backends.mkldnn.enabled = settings.onednn
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = onednn


def weights_digest(model) -> str:
    """A short hash of every parameter's bytes: two builds give the same base exactly when it matches."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


READING_EXAMPLES = 400  # records of the base's read-out check (a standard error of about 2 points)


def reading_accuracy(model, tokenizer, settings: TinyBaseSettings) -> Optional[float]:
    """The shortcut base's accuracy on its own question (the majority of all fields) on fresh records:
    whether it learned to read; None for the other tasks."""
    if settings.task != "shortcut":
        return None
    from causalattn.lab.training.distributed import DistContext
    from causalattn.lab.training.evaluate import accuracy

    examples = shortcut.overall_examples(READING_EXAMPLES, seed=settings.seed + 1_000_003)
    return accuracy(model, tokenizer, examples, stg.LABELS, context=DistContext(0, 1, 0, torch.device("cpu")),
                    batch_size=64)


def build_tiny_base(settings: TinyBaseSettings, directory: Path, *, show_progress: bool = True,
                    log: Callable[[str], None] = print) -> dict:
    """Build the tiny base into `directory` (which must not exist yet); returns what was recorded. Without a
    progress bar, `log` gets a line at every quarter of each pre-training round."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    with build_conditions(settings):
        torch.manual_seed(settings.seed)
        texts = base_texts(settings)
        tokenizer = train_tokenizer(texts, settings.vocab_size,
                                    split_on_spaces_only=settings.task in ("shortcut", "dialects"))
        model = build_model(settings, tokenizer)
        rounds: list[Optional[float]] = []
        while True:
            steps = len(texts) // settings.batch_size
            bar = tqdm(total=steps, desc=f"tiny base: pre-training round {len(rounds) + 1}", unit="step",
                       disable=not show_progress, dynamic_ncols=True)

            def progress(step: int, steps: int, loss: float) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                if not show_progress and step % max(steps // 4, 1) == 0:
                    log(f"tiny base (seed {settings.seed}): round {len(rounds) + 1}, step {step}/{steps}, "
                        f"loss {loss:.3f}, {time.perf_counter() - start:.0f} s")

            final_loss = pretrain(model, tokenizer, texts, settings, progress)
            bar.close()
            rounds.append(reading_accuracy(model, tokenizer, settings))
            if rounds[-1] is None or rounds[-1] >= settings.reading_target or len(rounds) >= settings.max_rounds:
                break
            log(f"tiny base (seed {settings.seed}): reads its own question right {rounds[-1]:.0%} after round "
                f"{len(rounds)}, below {settings.reading_target:.0%}: another round")
            texts = base_texts(settings, len(rounds))
    record = {"settings": dataclasses.asdict(settings), "recipe": RECIPE_VERSION, "final_lm_loss": final_loss,
              "reading_accuracy": rounds[-1], "reading_by_round": rounds,
              "parameters": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - start,
              "weights_sha256": weights_digest(model)}
    directory.mkdir(parents=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / SETTINGS_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def read_record(directory: Path) -> dict:
    """What `build_tiny_base` recorded about a built base (settings, parameters, loss, seconds)."""
    return json.loads((Path(directory) / SETTINGS_NAME).read_text(encoding="utf-8"))


def ensure_tiny_base(settings: TinyBaseSettings = TinyBaseSettings(), root: Optional[Path] = None, *,
                     show_progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """The cached tiny base checkpoint directory, built first if it is not there yet."""
    final = cached_path(settings, root)
    if (final / SETTINGS_NAME).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    log(f"building the embedded tiny LLaMA, seed {settings.seed} (once; cached in {final})")
    staging = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    try:
        record = build_tiny_base(settings, staging, show_progress=show_progress, log=log)
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / SETTINGS_NAME).is_file():  # not a concurrent build that finished first
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    reads = record["reading_accuracy"]
    log(f"tiny LLaMA (seed {settings.seed}): {record['parameters']:,} parameters, language-model loss "
        f"{record['final_lm_loss']:.3f}" + (f", reads its own question right {reads:.0%}" if reads is not None else "")
        + f", after {record['seconds']:.0f} s")
    return final
