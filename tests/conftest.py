"""Shared pytest fixtures.

Without a CUDA device the Triton kernels run through Triton's interpreter; the variable must be set
before any @triton.jit decorator runs, i.e. before causalattn.kernels is imported.
"""
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
