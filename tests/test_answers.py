"""VQA answers: the official normalisation, the leave-one-annotator-out accuracy, soft targets, the vocabulary."""

import pytest
import torch

from vlm.data.answers import AnswerVocab, normalize_answer, soft_score
from vlm.metrics import VQAScore, vqa_accuracy


@pytest.mark.parametrize("text,expected", [
    ("Two dogs.", "2 dogs"),                 # number word, final period, case
    ("the cat's", "cat's"),                  # article dropped, apostrophe kept
    ("black-and-white", "black and white"),  # punctuation inside a word becomes a space
    ("yes !", "yes"),                        # punctuation beside a space is deleted
    ("1,000", "1000"),                       # digit-comma-digit: commas deleted
    ("3.5", "3.5"),                          # a period between digits stays
    ("Dont know", "don't know"),             # contraction without its apostrophe
    ("couldnt've", "couldn't've"),           # part of the apostrophes missing
    ("  A\tRed  ball\n", "red ball"),        # whitespace
    ("none", "0"),
    ("its", "its"),                          # the bare spelling of a contraction that is another word stays
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_three_of_ten_annotators_score_0_9_not_1():
    # Leaving out one of the 3 matching annotators leaves 2 matches (2/3), the other 7 subsets keep 3 (1.0):
    # (3 * 2/3 + 7 * 1) / 10 = 0.9.
    assert vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)


@pytest.mark.parametrize("hits,expected", [
    (0, 0.0),
    (1, 0.3),                                # (1 * 0 + 9 * 1/3) / 10
    (2, 0.6),                                # (2 * 1/3 + 8 * 2/3) / 10
    (4, 1.0),
    (10, 1.0),
])
def test_vqa_accuracy_by_number_of_matches(hits, expected):
    assert vqa_accuracy("red", ["red"] * hits + ["blue"] * (10 - hits)) == pytest.approx(expected)


def test_vqa_accuracy_normalises_prediction_and_answers():
    assert vqa_accuracy("Two.", ["2"] * 4 + ["three"] * 6) == 1.0
    assert vqa_accuracy("3", ["2"] * 4 + ["three"] * 6) == 1.0
    with pytest.raises(ValueError, match="no answers"):
        vqa_accuracy("yes", [])


def test_soft_scores_follow_vilt():
    assert [soft_score(c) for c in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]


def test_vocabulary_keeps_answers_seen_min_count_times_and_counts_the_rest():
    train = [["yes"] * 10, ["Yes"] * 9 + ["no"], ["no"] * 9 + ["2"], ["two"] * 5 + ["blue"] * 5]
    assert AnswerVocab.build(train, min_count=9).answers == ["yes", "no"]   # 19 and 10 times; "2": 1 + 5
    vocab = AnswerVocab.build(train, min_count=6)
    assert vocab.answers == ["yes", "no", "2"]                               # most frequent first
    assert AnswerVocab.build(train, min_count=5).answers == ["yes", "no", "2", "blue"]
    targets, outside = vocab.targets(["yes"] * 2 + ["no"] * 5 + ["maybe"] * 3)
    assert targets == {0: 0.6, 1: 1.0} and outside == 3
    with pytest.raises(ValueError, match="min_count"):
        AnswerVocab.build(train, min_count=100)


def test_a_vocabulary_of_no_answers_does_not_advise_a_lower_min_count():
    for lists in ([], [[], []], [["the"] * 10]):  # no questions, none with answers, only empty answers
        with pytest.raises(ValueError, match="no question has answers") as e:
            AnswerVocab.build(lists, min_count=1)
        assert "min_count" not in str(e.value)


def test_vqa_score_metric_is_the_mean_over_questions():
    m = VQAScore()
    m.update(torch.tensor([1.0, 0.0]))
    m.update(torch.tensor([0.9]))
    assert m.compute().item() == pytest.approx(1.9 / 3)
