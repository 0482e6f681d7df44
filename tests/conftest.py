"""Shared pytest fixtures, and the support matrix's recorder.

Without a CUDA device the Triton kernels run through Triton's interpreter; the variable must be set
before any @triton.jit decorator runs, i.e. before causalattn.kernels is imported.
"""
import json
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

RISK_FACTORS = ("Smoking", "Weight", "Exercise", "Yellow fingers", "Age", "Stress")
RISK_ANSWERS = ("High Risk", "Low Risk", "Medium Risk")


def risk_sentence(rng: random.Random) -> str:
    """A CAT-style tabular sentence: 'Smoking: 7, Weight: 3, ... Answer: High Risk'."""
    factors = rng.sample(RISK_FACTORS, 4)
    facts = ", ".join(f"{factor}: {rng.randint(0, 10)}" for factor in factors)
    return f"{facts}. Answer: {rng.choice(RISK_ANSWERS)}"


@pytest.fixture(scope="session")
def risk_sentences():
    """48 generated CAT-style sentences: the tokenizer's training corpus, reusable as test texts."""
    rng = random.Random(0)
    return tuple(risk_sentence(rng) for _ in range(48))


@pytest.fixture(scope="session")
def trained_bpe(risk_sentences):
    """A byte-level BPE (vocab 300: the 256 bytes plus merges) trained in-process, with a BOS template.

    No hub downloads exist on the test machines, so a real tokenizer has to be trained here. The BOS
    token shifts every content token by one, as LLaMA's tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(risk_sentences, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return tokenizer


@pytest.fixture
def tiny_tokenizer(trained_bpe):
    """`trained_bpe` as a transformers tokenizer with a pad token; a fresh wrapper per test, so a test
    may change `padding_side` without affecting the others."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=trained_bpe, bos_token="<s>", pad_token="<pad>")


@pytest.fixture
def single_thread():
    """Small tensors: one intra-op thread is faster, and two threads per test process thrash a 2-core CI
    machine (gradcheck ran 20x slower with two threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ support matrix
# Tests marked `@pytest.mark.support(feature, passed=...)` and parametrized by `family` are the cells of
# the support matrix. With CAUSALATTN_SUPPORT_RESULTS=<file> their outcomes are written there as JSON,
# which tools/support_matrix.py renders; a cell several tests share fails if any of them fails.
SUPPORT_RESULTS = os.environ.get("CAUSALATTN_SUPPORT_RESULTS")
_support_cells: dict = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    marker = item.get_closest_marker("support")
    if not SUPPORT_RESULTS or marker is None or not hasattr(item, "callspec"):
        return
    key = (item.callspec.params["family"], marker.args[0])
    if report.failed:
        _support_cells[key] = {"cell": "fails", "test": item.nodeid}
    elif report.skipped and key not in _support_cells:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _support_cells[key] = {"cell": "n/a", "test": item.nodeid, "reason": reason.removeprefix("Skipped: ")}
    elif report.when == "call" and report.passed and _support_cells.get(key, {}).get("cell") != "fails":
        _support_cells[key] = {"cell": marker.kwargs.get("passed", "yes"), "test": item.nodeid}


def pytest_sessionfinish(session):
    if SUPPORT_RESULTS and _support_cells:
        rows = [{"family": family, "feature": feature, **value} for (family, feature), value in _support_cells.items()]
        with open(SUPPORT_RESULTS, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)
