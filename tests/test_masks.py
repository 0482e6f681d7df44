"""CausalMask (docs/math.md §2): bit packing, builders, counts, and encode_with_causes with a real tokenizer."""

import pytest
import torch

from causalattn import CausalMask, attention_dense, encode_with_causes
from causalattn.masks import pack_bits, popcount, unpack_bits


def random_bools(*shape, seed, p=0.5):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen) < p


# ---------------------------------------------------------------------- bit packing
@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 63, 64, 70])
def test_pack_unpack_round_trip(n):
    dense = random_bools(3, 4, n, seed=n)
    dense[..., -1] = True  # the last column, in a partly used last word
    if n > 31:
        dense[0, 0, 31] = True  # bit 31 is the int32 sign bit
    words = pack_bits(dense)
    assert words.dtype == torch.int32
    assert words.shape == (3, 4, (n + 31) // 32)
    assert torch.equal(unpack_bits(words, n), dense)


def test_pack_bits_layout():
    # A round trip would pass with any bit order; the kernels rely on this exact one.
    dense = torch.zeros(4, 40, dtype=torch.bool)
    dense[0, 0] = True
    dense[1, 31] = True
    dense[2, 32] = True
    dense[3, [1, 3, 39]] = True
    words = pack_bits(dense)
    expected = torch.tensor([[1, 0], [-(2**31), 0], [0, 1], [0b1010, 1 << 7]], dtype=torch.int32)
    assert torch.equal(words, expected)


def test_popcount():
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**31), 2**31, (5, 7), generator=gen, dtype=torch.int64).to(torch.int32)
    words[0, :4] = torch.tensor([0, -1, -(2**31), 2**31 - 1], dtype=torch.int32)
    expected = [sum(bin(w & 0xFFFFFFFF).count("1") for w in row) for row in words.tolist()]
    counts = popcount(words)
    assert counts.dtype == torch.int32
    assert counts.tolist() == expected


# ---------------------------------------------------------------------- from_dense and the counts
def expected_counts(dense, key_mask):
    """n1, visible and valid per row by direct enumeration of docs/math.md §2 (keys j <= i, padding excluded)."""
    batch, n, _ = dense.shape
    cause_count = torch.zeros(batch, n, dtype=torch.int32)
    visible = torch.zeros(batch, n, dtype=torch.int32)
    for b in range(batch):
        for i in range(n):
            keys = [j for j in range(i + 1) if key_mask is None or key_mask[b, j]]
            visible[b, i] = len(keys)
            cause_count[b, i] = sum(bool(dense[b, i, j]) for j in keys)
    return cause_count, visible


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_from_dense_drops_upper_triangle_and_padding(padding):
    n = 11
    dense = random_bools(3, n, n, seed=1)
    key_mask = None
    if padding != "none":
        key_mask = torch.ones(3, n, dtype=torch.bool)
        if padding == "left":
            key_mask[1, :3] = False
            key_mask[2, :1] = False
        else:
            key_mask[1, 7:] = False
            key_mask[2, 10:] = False
    mask = CausalMask.from_dense(dense, key_mask)

    kept = dense & torch.ones(n, n, dtype=torch.bool).tril()
    if key_mask is not None:
        kept &= key_mask[:, None, :]
    assert torch.equal(mask.to_dense(), kept)
    cause_count, visible = expected_counts(dense, key_mask)
    assert torch.equal(mask.cause_count, cause_count)
    assert torch.equal(mask.visible, visible)
    assert torch.equal(mask.non_cause_count, visible - cause_count)
    assert torch.equal(mask.valid_rows(), (cause_count > 0) & (visible - cause_count > 0))
    assert mask.batch_size == 3 and mask.seq_len == n


def test_unpack_rows_blocks():
    n = 37  # two words per row, the second partly used
    dense = random_bools(2, n, n, seed=2)
    mask = CausalMask.from_dense(dense)
    full = mask.to_dense()
    assert torch.equal(full, dense & torch.ones(n, n, dtype=torch.bool).tril())
    for start, end in [(0, 5), (5, 32), (32, 37), (3, 4)]:
        assert torch.equal(mask.unpack_rows(start, end), full[:, start:end])


def test_to_device():
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, :2] = False
    mask = CausalMask.from_dense(random_bools(2, 9, 9, seed=3), key_mask)
    same = mask.to("cpu")
    assert same.device == torch.device("cpu")
    assert torch.equal(same.to_dense(), mask.to_dense())
    assert torch.equal(same.cause_count, mask.cause_count) and torch.equal(same.visible, mask.visible)
    # The meta device needs no accelerator and shows that every tensor travels with the mask.
    moved = mask.to("meta")
    for tensor in (moved.bits, moved.cause_count, moved.visible, moved.key_mask):
        assert tensor.device == torch.device("meta")
    assert moved.seq_len == 9 and moved.bits.shape == mask.bits.shape


@pytest.mark.parametrize("bits", [torch.zeros(2, 5, 1, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.int32),
                                  torch.zeros(2, 5, 2, dtype=torch.int32), torch.zeros(2, 6, 1, dtype=torch.int32)])
def test_constructor_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        CausalMask(bits, 5)


# ---------------------------------------------------------------------- from_spans
def test_from_spans_builds_expected_matrix():
    n = 14
    key_mask = torch.ones(2, n, dtype=torch.bool)
    key_mask[1, :2] = False  # left padding in sample 1
    spans = [
        [((6, 8), [(1, 3), (4, 5)]), ((11, 14), [(0, 1), (8, 10)])],
        [((9, 11), [(2, 4)]), ((12, 13), [(5, 6)])],
    ]
    mask = CausalMask.from_spans(spans, n, key_mask)

    expected = torch.zeros(2, n, n, dtype=torch.bool)
    for b, pairs in enumerate(spans):
        for (e0, e1), causes in pairs:
            for row in range(e0 - 1, e1 - 1):  # the rows that predict the effect tokens
                for c0, c1 in causes:
                    expected[b, row, c0:c1] = True
    assert torch.equal(mask.to_dense(), expected)
    cause_count, visible = expected_counts(expected, key_mask)
    assert torch.equal(mask.cause_count, cause_count)
    assert torch.equal(mask.visible, visible)
    assert mask.cause_count[0, 10] == 3 and mask.cause_count[1, 8] == 2  # spot checks of the rule itself


@pytest.mark.parametrize("spans, message", [
    ([[((3, 13), [(0, 1)])]], r"spans\[0\] effect \(3, 13\).*seq_len=12"),
    ([[((5, 7), [(-1, 2)])]], r"spans\[0\] cause \(-1, 2\)"),
    ([[((5, 7), [(2, 2)])]], r"spans\[0\] cause \(2, 2\)"),
    ([[((5, 7), [(0, 1)])], [((5, 7), [(2, 5)])]], r"spans\[1\]: cause \(2, 5\) must end before effect"),
    ([[((5, 7), [(3, 6)])]], r"spans\[0\]: cause \(3, 6\) must end before effect"),
    ([[((0, 2), [(0, 1)])]], r"spans\[0\] effect \(0, 2\): an effect at position 0"),
    ([[((5, 7), [5])]], r"spans\[0\] cause: expected a \(start, end\) pair of ints, got 5"),
    ([[((5, 7), [("a", 2)])]], r"spans\[0\] cause: expected a \(start, end\) pair"),
    ([[((5, 7, 9), [(0, 1)])]], r"spans\[0\] effect: expected a \(start, end\) pair"),
], ids=["effect-out-of-range", "cause-negative", "cause-empty", "cause-touches-effect", "cause-overlaps-effect",
        "effect-at-0", "span-not-a-pair", "span-not-ints", "span-three-ints"])
def test_from_spans_rejects_bad_spans(spans, message):
    with pytest.raises(ValueError, match=message):
        CausalMask.from_spans(spans, 12)


def test_from_spans_rejects_cause_on_padding():
    key_mask = torch.ones(1, 12, dtype=torch.bool)
    key_mask[0, :3] = False
    with pytest.raises(ValueError, match=r"spans\[0\]: a cause of effect \(8, 9\) covers padding"):
        CausalMask.from_spans([[((8, 9), [(2, 5)])]], 12, key_mask)


def test_from_spans_long_sequence_stays_packed():
    # A dense (2, 16384, 16384) bool would be 512 MB; the packed mask is 64 MB (its build time is a
    # benchmark matter, not a test's: ~3 s on a 2-core CPU).
    n = 16384
    spans = [[((16000, 16100), [(10, 5000), (8000, 8010)])], [((300, n), [(0, 299)])]]
    mask = CausalMask.from_spans(spans, n)
    assert mask.bits.shape == (2, n, 512) and mask.bits.dtype == torch.int32
    assert mask.cause_count[0, 15999:16099].eq(5000).all() and mask.cause_count[0, 16099] == 0
    assert mask.cause_count[1, 298] == 0 and mask.cause_count[1, 299:-1].eq(299).all() and mask.cause_count[1, -1] == 0
    assert torch.equal(mask.unpack_rows(16050, 16051)[0, 0].nonzero().flatten(),
                       torch.cat([torch.arange(10, 5000), torch.arange(8000, 8010)]))


# ---------------------------------------------------------------------- encode_with_causes
def token_char_ranges(tokenizer, ids):
    """Character range of each token in the text, found by decoding tokens one by one (no offsets API):
    special tokens get an empty range; a token's leading whitespace is not part of its range."""
    special = set(tokenizer.all_special_ids)
    ranges, position = [], 0
    for token_id in ids:
        if token_id in special:
            ranges.append((position, position))
            continue
        piece = tokenizer.decode([token_id])
        stripped = piece.lstrip()
        start = position + len(piece) - len(stripped)
        position += len(piece)
        ranges.append((start, position))
    return ranges


def expected_token_positions(tokenizer, ids, text, phrase):
    """Token indices overlapping any occurrence of `phrase`, one list per occurrence."""
    ranges = token_char_ranges(tokenizer, ids)
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == text, "the per-token decoding must reproduce the text for this derivation"
    occurrences = []
    start = text.find(phrase)
    while start >= 0:
        end = start + len(phrase)
        occurrences.append([t for t, (a, b) in enumerate(ranges) if a < end and b > start and b > a])
        start = text.find(phrase, start + 1)
    return occurrences


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_encode_with_causes_marks_effect_rows_and_cause_columns(tiny_tokenizer, padding_side):
    tiny_tokenizer.padding_side = padding_side
    texts = [
        "Smoking: 7, Weight: 3, Exercise: 5, Yellow fingers: 10. Answer: High Risk",
        "Age: 4, Stress: 9. Answer: Medium Risk",
        "Stress: 2, Smoking: 1. Answer: Low Risk, Yellow fingers: 1",
    ]
    annotations = [
        {"High Risk": ["Smoking", "Yellow fingers"]},
        {"Medium Risk": ["Stress"], "Stress": ["Age"]},
        {"Low Risk": ["Smoking", "Yellow fingers"]},  # a cause after the effect does not count
    ]
    encoding, mask = encode_with_causes(tiny_tokenizer, texts, annotations)
    ids = encoding["input_ids"]
    attention_mask = encoding["attention_mask"].bool()
    n = ids.shape[1]
    assert mask.bits.shape == (3, n, (n + 31) // 32)
    assert "offset_mapping" not in encoding

    expected = torch.zeros(3, n, n, dtype=torch.bool)
    for b, (text, annotation) in enumerate(zip(texts, annotations)):
        real = attention_mask[b].nonzero().flatten().tolist()  # positions of real tokens, in order
        real_ids = ids[b, real].tolist()
        assert real_ids[0] == tiny_tokenizer.bos_token_id
        for effect, causes in annotation.items():
            for effect_tokens in expected_token_positions(tiny_tokenizer, real_ids, text, effect):
                for cause in causes:
                    for cause_tokens in expected_token_positions(tiny_tokenizer, real_ids, text, cause):
                        if cause_tokens[-1] < effect_tokens[0] - 1:
                            for row in effect_tokens:
                                expected[b, real[row] - 1, [real[c] for c in cause_tokens]] = True
    assert torch.equal(mask.to_dense(), expected)
    assert torch.equal(mask.key_mask, attention_mask)
    assert mask.valid_rows().any(dim=1).all()

    # One row by hand: the token before "H igh ĠRisk" attends to "S moking" and "Yellow Ġfingers".
    real = attention_mask[0].nonzero().flatten().tolist()
    tokens = tiny_tokenizer.convert_ids_to_tokens(ids[0, real].tolist())
    assert tokens[:3] == ["<s>", "S", "moking"] and tokens[-3:] == ["H", "igh", "ĠRisk"]
    yellow = tokens.index("Yellow")
    assert tokens[yellow + 1] == "Ġfingers"
    row = mask.to_dense()[0, real[-4]]
    assert row.nonzero().flatten().tolist() == [real[1], real[2], real[yellow], real[yellow + 1]]


def test_encode_with_causes_errors(tiny_tokenizer):
    text = ["Smoking: 7, Weight: 3. Answer: High Risk"]
    with pytest.raises(ValueError, match=r"annotations\[0\]: effect 'Low Risk' not found"):
        encode_with_causes(tiny_tokenizer, text, [{"Low Risk": ["Smoking"]}])
    with pytest.raises(ValueError, match=r"annotations\[0\]: cause 'Exercise' of 'High Risk' not found"):
        encode_with_causes(tiny_tokenizer, text, [{"High Risk": ["Exercise"]}])
    with pytest.raises(ValueError, match=r"annotations\[0\]: no cause of effect 'Smoking' occurs before it"):
        encode_with_causes(tiny_tokenizer, text, [{"Smoking": ["Weight"]}])
    with pytest.raises(ValueError, match="annotations: expected one mapping per text"):
        encode_with_causes(tiny_tokenizer, text * 2, [{"High Risk": ["Smoking"]}])


def test_encode_with_causes_on_generated_sentences(tiny_tokenizer, risk_sentences):
    # Every factor a cause of the answer: the row predicting the answer's last token sees all four.
    texts = list(risk_sentences[:6])
    annotations = []
    for text in texts:
        factors = [part.split(":")[0].strip() for part in text.split(". Answer")[0].split(",")]
        annotations.append({text.split("Answer: ")[1]: factors})
    encoding, mask = encode_with_causes(tiny_tokenizer, texts, annotations)
    lengths = encoding["attention_mask"].sum(1)
    for b in range(len(texts)):
        last_row = int(lengths[b]) - 2  # predicts the final token of the answer
        cause_tokens = mask.to_dense()[b, last_row].nonzero().flatten().tolist()
        covered = tiny_tokenizer.decode(encoding["input_ids"][b, cause_tokens].tolist())
        for factor in annotations[b][next(iter(annotations[b]))]:
            assert factor.replace(" ", "") in covered.replace(" ", "")
        assert mask.cause_count[b, last_row] == len(cause_tokens)


def test_packed_mask_counts_only_own_sequence():
    """With packing, causes outside a row's sequence are dropped and n0 counts only its own keys."""
    bounds = torch.tensor([0, 5, 5, 12])
    mask = CausalMask.from_dense(torch.ones(1, 12, 12, dtype=torch.bool), cu_seqlens=bounds)
    dense = mask.to_dense()[0]
    assert dense[4, :5].all() and not dense[5, :5].any() and dense[11, 5:].all()
    assert mask.visible[0].tolist() == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6, 7]
    assert mask.non_cause_count.sum() == 0 and mask.cu_seqlens.tolist() == bounds.tolist()
    spans = [[((9, 11), [(5, 7)])]]
    packed = CausalMask.from_spans(spans, 12, cu_seqlens=bounds)
    assert packed.cause_count[0, 8].item() == 2 and packed.visible[0, 8].item() == 4
    with pytest.raises(ValueError, match="different packed sequences"):
        CausalMask.from_spans([[((9, 11), [(2, 4)])]], 12, cu_seqlens=bounds)
    with pytest.raises(ValueError, match="cu_seqlens: packed sequences need batch 1"):
        CausalMask.from_dense(torch.ones(2, 12, 12, dtype=torch.bool), cu_seqlens=bounds)


def test_packed_attention_needs_a_packed_mask():
    q = torch.randn(1, 2, 12, 16)
    mask = CausalMask.from_dense(torch.ones(1, 12, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="supervision: the CausalMask must be built with the same cu_seqlens"):
        attention_dense(q, q, q, cu_seqlens=torch.tensor([0, 5, 12]), supervision=mask)
