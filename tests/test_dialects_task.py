"""The two-dialect task of the routed-adapter demo: one rule, two surfaces, a cue per dialect."""
import pytest

from causalattn.lab.tasks import dialects
from causalattn.lab.tasks.stg import LABELS


def cue_word(example):
    return next(word for word in dialects.record_fields(example)
                if any(word.startswith(d.cue_name + d.joiner) for d in dialects.DIALECTS))


def cue_agrees(example):
    dialect = next(d for d in dialects.DIALECTS if cue_word(example).startswith(d.cue_name + d.joiner))
    return cue_word(example) == dialect.cue_word(dialect.cue_values[LABELS.index(example.target)])


def test_each_dialect_writes_every_field_and_the_label_follows_the_rule():
    for index, example in enumerate(dialects.generate(200, seed=1)):
        body = dialects.DIALECTS[example.domain]
        assert example.domain == index % 2
        words = dialects.record_fields(example)
        assert sorted(words) == sorted(
            [body.word(f, example.values[f]) for f in dialects.FIELDS] + [cue_word(example)])
        assert example.input.endswith(body.question)
        assert example.target == dialects.label_of(example.values)
        assert example.important == {example.target: [body.word(f, example.values[f]) for f in dialects.CAUSES]}


@pytest.mark.parametrize("agreement", [0.8, 0.93])
def test_cues_agree_as_asked_and_flip_in_the_flipped_set(agreement):
    train = dialects.generate(4000, seed=2, agreement=agreement)
    for domain in (0, 1):
        own = [e for e in train if e.domain == domain]
        share = sum(map(cue_agrees, own)) / len(own)
        assert abs(share - agreement) < 0.03  # 4 standard errors at n = 2000
        assert all(cue_word(e).startswith(dialects.DIALECTS[domain].cue_name) for e in own)
    assert not any(map(cue_agrees, dialects.generate(300, seed=3, mode="flipped")))


def test_recombined_mixes_the_dialects_and_the_cue_is_a_coin_flip():
    examples = dialects.generate(2000, seed=4, mode="random", recombined=True)
    for example in examples:
        other = dialects.DIALECTS[1 - example.domain]
        assert example.input.endswith(other.question)
        assert cue_word(example).startswith(other.cue_name + other.joiner)
    assert abs(sum(map(cue_agrees, examples)) / len(examples) - 0.5) < 0.045


def test_splits_are_seeded_and_both_labels_occur():
    train, tests = dialects.make_splits(400, 50, seed=5)
    again, _ = dialects.make_splits(400, 50, seed=5)
    assert [e.input for e in train] == [e.input for e in again]
    assert set(tests) == {"iid", "flipped", "recombined"}
    high = sum(e.target == LABELS[0] for e in train) / len(train)
    assert 0.4 < high < 0.6  # two of three causes read high on half of the uniform draw


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mode"):
        dialects.generate(3, seed=0, mode="independent")
    with pytest.raises(ValueError, match="agreement"):
        dialects.generate(3, seed=0, agreement=0.2)


def test_base_text_answers_the_overall_question_by_the_majority_of_its_fields():
    import random

    rng = random.Random(6)
    overall = 0
    for _ in range(400):
        text = dialects.base_text(rng, cancer_share=0.2)
        record, answer = text.rsplit("Answer: ", 1)
        asked = [d for d in dialects.DIALECTS if record.endswith(d.overall_question[:-len("Answer:")])]
        if not asked:  # the cancer question, with a random answer
            continue
        dialect = asked[0]
        overall += 1
        words = record.split(" ")[: len(dialects.FIELDS) + 1]
        highs = [w == dialect.cue_word(dialect.cue_values[0]) if w.startswith(dialect.cue_name + dialect.joiner)
                 else int(w[-1]) >= dialects.HIGH_FROM for w in words]
        assert answer == dialects.majority_label(highs)
    assert 250 < overall < 390  # about 80 % ask the overall question
