"""Bad supervision input never gives silently wrong numbers: `CausalMask` storage and bits,
its builders (spans, dense masks, annotations, lengths, packing offsets) and the CAT loss's masses
each raise a clear error naming the argument, or give the reference's result on every backend."""
import math

import pytest
import torch

from causalattn import CausalMask, attention, attention_dense, cat_loss, encode_with_causes
from causalattn.losses import CAT_LOSS_KINDS, cat_row_losses
from op_backends import DEVICE, OP_BACKENDS, op_backend, raises_named, random_qkv

# ---------------------------------------------------------------------- 2. non-contiguous mask bits
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_cropped_mask_gives_the_cropped_mass(backend):
    """Rows and words cropped out of a longer mask: a strided view of its bits."""
    gen = torch.Generator().manual_seed(5)
    full = CausalMask.from_dense(torch.rand(2, 70, 70, generator=gen) < 0.4)
    cropped_bits = full.bits[:, :40, :2]
    assert not cropped_bits.is_contiguous()
    cropped = CausalMask(cropped_bits, 40).to(DEVICE)
    assert cropped.bits.is_contiguous()
    q, k, v = random_qkv(6, batch=2, n=(40, 40))
    got = attention(q.float(), k.float(), v.float(), supervision=cropped, backend=op_backend(backend))
    want = attention_dense(q, k, v, supervision=CausalMask.from_dense(full.to_dense()[:, :40, :40].to(DEVICE)))
    torch.testing.assert_close(got.mass.double(), want.mass, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------- 8. bits a row cannot see
def _bits_with(batch, n, row, col):
    bits = torch.zeros(batch, n, (n + 31) // 32, dtype=torch.int32)
    bits[0, 1, 0] = 1  # a valid cause: row 1 -> key 0
    bits[batch - 1, row, col // 32] |= torch.tensor(1 << (col % 32)).to(torch.int32)
    return bits


@pytest.mark.parametrize("row, col, options", [
    (3, 4, {}),  # above the diagonal
    (0, 1, {}),
    (10, 31, {}),  # bit 31 (the int32 sign bit) of row 10
    (39, 40, {}),  # past seq_len in the last word
    (12, 2, dict(key_mask=torch.arange(40) >= 5)),  # a padding key (left padding)
    (30, 10, dict(cu_seqlens=torch.tensor([0, 20, 40]))),  # a key of the previous packed sequence
], ids=["above-diagonal", "row-0", "sign-bit", "past-n", "padding-key", "other-sequence"])
def test_mask_bits_a_row_cannot_see_raise(row, col, options):
    batch = 1 if "cu_seqlens" in options else 2
    if "key_mask" in options:
        options = dict(key_mask=options["key_mask"].expand(batch, 40).clone())
    raises_named(ValueError, "bits", CausalMask, _bits_with(batch, 40, row, col), 40, **options)


def test_mask_counts_stay_consistent_with_visible_bits():
    bits = _bits_with(2, 40, 39, 39)  # the diagonal itself is visible
    mask = CausalMask(bits, 40)
    assert int(mask.non_cause_count.min()) >= 0
    assert torch.equal(mask.to_dense(), CausalMask.from_dense(mask.to_dense()).to_dense())


# ---------------------------------------------------------------------- 4 and "also": mask builders
def test_cause_given_as_a_string_raises(tiny_tokenizer):
    text = "Smoking: 7, Weight: 3, Age: 5, Stress: 1. Answer: High Risk"
    with pytest.raises(TypeError, match=r"annotations\[0\]\['High Risk'\]: expected a list of cause phrases"):
        encode_with_causes(tiny_tokenizer, [text], [{"High Risk": "Smoking: 7"}])
    with pytest.raises(TypeError, match=r"annotations\[0\]: expected a mapping"):
        encode_with_causes(tiny_tokenizer, [text], [["High Risk", "Smoking: 7"]])
    _, mask = encode_with_causes(tiny_tokenizer, [text], [{"High Risk": ["Smoking: 7"]}])
    assert int(mask.cause_count.sum()) > 0


@pytest.mark.parametrize("span", [((3.5, 6), [(0, 2)]), ((4, 6), [(0.9, 2)]), ((4, 6), [(True, 2)])],
                         ids=["float-effect", "float-cause", "bool-cause"])
def test_non_integer_spans_raise(span):
    with pytest.raises(ValueError, match=r"spans\[0\] (effect|cause): expected a \(start, end\) pair of ints"):
        CausalMask.from_spans([[span]], 8)


def test_effect_across_a_packed_boundary_raises():
    """Rows 3-6 predict the effect (4, 8); row 6 lies in the second sequence (from 6), the cause in the first."""
    with pytest.raises(ValueError, match=r"spans\[0\]: cause \(1, 3\) and effect \(4, 8\) lie in different packed"):
        CausalMask.from_spans([[((4, 8), [(1, 3)])]], 10, cu_seqlens=torch.tensor([0, 6, 10]))


def test_integer_scalar_spans_are_accepted():
    spans = [[((torch.tensor(4), 6), [(torch.tensor(0), 2)])]]
    assert torch.equal(CausalMask.from_spans(spans, 8).bits, CausalMask.from_spans([[((4, 6), [(0, 2)])]], 8).bits)


@pytest.mark.parametrize("value", [0.5, math.nan, 2.0, -1.0], ids=["half", "nan", "two", "minus-one"])
def test_dense_mask_entries_other_than_0_and_1_raise(value):
    dense = torch.zeros(1, 6, 6)
    dense[0, 3, 1] = 1.0
    dense[0, 4, 2] = value
    raises_named(ValueError, "dense", CausalMask.from_dense, dense)


def test_dense_mask_of_0_and_1_equals_the_bool_mask():
    dense = torch.rand(2, 9, 9, generator=torch.Generator().manual_seed(9)) < 0.5
    for dtype in (torch.float32, torch.int64):
        assert torch.equal(CausalMask.from_dense(dense.to(dtype)).bits, CausalMask.from_dense(dense).bits)


@pytest.mark.parametrize("seq_len", [-1, 2.0, True, None])
def test_bad_seq_len_raises(seq_len):
    raises_named(ValueError, "seq_len", CausalMask.from_spans, [[]], seq_len)
    raises_named(ValueError, "seq_len", CausalMask, torch.zeros(1, 0, 0, dtype=torch.int32), seq_len)


def test_bool_packing_offsets_raise():
    raises_named(ValueError, "cu_seqlens", CausalMask.from_dense, torch.ones(1, 1, 1, dtype=torch.bool),
                 cu_seqlens=torch.tensor([False, True]))


# ---------------------------------------------------------------------- 7. CAT masses
def _mask_and_mass(seed=12, batch=2, n=10):
    gen = torch.Generator().manual_seed(seed)
    mask = CausalMask.from_dense(torch.rand(batch, n, n, generator=gen) < 0.3)
    return mask, torch.rand(batch, 2, n, generator=gen, dtype=torch.float64) * 0.5


@pytest.mark.parametrize("kind", CAT_LOSS_KINDS)
@pytest.mark.parametrize("bad", [math.nan, 1.5, -0.2, 1.01], ids=["nan", "above-one", "negative", "just-above-one"])
def test_impossible_cat_mass_raises(kind, bad):
    mask, mass = _mask_and_mass()
    rows = mask.valid_rows().nonzero()
    mass[rows[0, 0], 1, rows[0, 1]] = bad  # one head of one supervised row
    raises_named(ValueError, "mass", cat_loss, mass, mask, kind=kind)
    raises_named(ValueError, "mass", cat_loss, [mass, mass.flip(0)], mask, kind=kind)
    mean_mass = mass.mean(1)
    mean_mass[rows[0, 0], rows[0, 1]] = bad
    raises_named(ValueError, "mean_mass", cat_row_losses, mean_mass, mask, kind=kind)


@pytest.mark.parametrize("kind", CAT_LOSS_KINDS)
def test_cat_mass_at_the_edges_is_accepted(kind):
    mask, mass = _mask_and_mass()
    mass[0, 0, :3] = torch.tensor([0.0, 1.0, 1.0 + 1e-6])
    mass[1, 1, :2] = torch.tensor([-1e-7, 1.0 - 1e-7])
    assert torch.isfinite(cat_loss(mass, mask, kind=kind))


def test_cat_loss_mask_must_be_a_causal_mask():
    mask, mass = _mask_and_mass()
    raises_named(TypeError, "mask", cat_loss, mass, mask.to_dense())
    raises_named(TypeError, "mask", cat_row_losses, mass.mean(1), None)
