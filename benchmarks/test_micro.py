"""pytest-benchmark micro benchmarks of the small CPU-side pieces around the kernels.

    python -m pytest benchmarks/test_micro.py                       # measure
    python -m pytest benchmarks/test_micro.py --benchmark-disable   # run each once (CI, seconds)

Sizes are a training step's: a packed N = 4096 batch of CAT-style documents for the mask, the
statistics of a few LLaMA-7B-shaped layers (32 heads, d = 128) for the losses. Each benchmark also
checks its result, so a disabled run is still a test.
"""
import pytest
import torch

import causalattn
from benchmarks.providers import DOCUMENT_LEN, EFFECT_LEN, cat_style_spans
from causalattn import CausalMask

SEQ_LEN = 4096
BATCH, HEADS, HEAD_DIM, LAYERS = 8, 32, 128, 4


@pytest.fixture(scope="module")
def mask() -> CausalMask:
    return CausalMask.from_spans(cat_style_spans(2, SEQ_LEN), SEQ_LEN)


def test_mask_from_spans(benchmark):
    spans = cat_style_spans(2, SEQ_LEN)
    built = benchmark(CausalMask.from_spans, spans, SEQ_LEN)
    assert built.bits.shape == (2, SEQ_LEN, SEQ_LEN // 32)
    assert int(built.valid_rows().sum()) == 2 * (SEQ_LEN // DOCUMENT_LEN) * EFFECT_LEN


def test_cat_loss_forward_backward(benchmark):
    batch, seq_len = 4, 1024
    small_mask = CausalMask.from_spans(cat_style_spans(batch, seq_len), seq_len)
    mass = torch.rand(LAYERS, batch, HEADS, seq_len, generator=torch.Generator().manual_seed(0)).mul_(0.1).requires_grad_()

    def step() -> torch.Tensor:
        mass.grad = None
        loss = causalattn.cat_loss(mass, small_mask)
        loss.backward()
        return loss

    loss = benchmark(step)
    assert torch.isfinite(loss) and loss < 0 and mass.grad.abs().sum() > 0


def test_xg_variance_forward_backward(benchmark):
    gen = torch.Generator().manual_seed(0)
    xg = [torch.randn(BATCH, HEADS, HEAD_DIM, generator=gen).requires_grad_() for _ in range(LAYERS)]
    o_proj = torch.randn(HEADS * HEAD_DIM, HEADS * HEAD_DIM, generator=gen) / (HEADS * HEAD_DIM) ** 0.5

    def step() -> torch.Tensor:
        for t in xg:
            t.grad = None
        variance = causalattn.xg_variance(xg, o_proj)
        variance.backward()
        return variance

    variance = benchmark(step)
    assert variance > 0 and all(t.grad is not None for t in xg)


def test_tile_summary(benchmark, mask):
    pytest.importorskip("triton")
    from causalattn.kernels.jit_helpers import tile_summary

    tiles = benchmark(tile_summary, mask.bits, 128, 64)
    assert tiles.shape == (2, SEQ_LEN // 128, SEQ_LEN // 64)
    # Only tiles holding an effect row and a cause column are set: a few percent of the lower triangle.
    assert 0 < int(tiles.sum()) < tiles.numel() // 10
