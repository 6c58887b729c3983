"""VQA answers: the official normalisation, the answer vocabulary and ViLT's soft targets.

The normalisation follows the VQA evaluation of Antol et al. 2015 / Goyal et al. 2017 (VQAv2): lower case,
punctuation removed (or turned into a space), periods kept only inside numbers, number words to digits,
articles dropped, contractions written with their apostrophes. The official script normalises only when the
ten answers disagree; here every answer and prediction is normalised, which gives the same score on the
released annotations (already normalised) and does not fail a prediction for its capital letter.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Iterable

# Contractions with their apostrophes; every spelling with some of them left out maps back here. Those whose
# bare spelling is another word (he'll -> hell, we're -> were, it's -> its, i'd -> id, ...) are not listed.
_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd've
he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't
shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll
they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's
where've who'd who'd've who'll who're who's who've why'll why're why's won't would've wouldn't wouldn't've
y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _spellings(word: str) -> Iterable[str]:
    """``word`` with every subset of its apostrophes removed, itself excluded."""
    parts = word.split("'")
    for keep in itertools.product(("'", ""), repeat=len(parts) - 1):
        spelled = parts[0] + "".join(k + p for k, p in zip(keep, parts[1:]))
        if spelled != word:
            yield spelled


CONTRACTIONS = {s: w for w in _CONTRACTIONS for s in _spellings(w)}
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBERS["none"] = "0"
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a period not between two digits
_NUMBER_COMMA = re.compile(r"\d,\d")


def normalize_answer(text: str) -> str:
    """An answer as the VQA evaluation compares it: "Two dogs." -> "2 dogs", "the cat's" -> "cat's"."""
    text = " ".join(text.lower().replace("\n", " ").replace("\t", " ").split())
    # A punctuation mark beside a space (or any, once the text has a digit-comma-digit) is deleted;
    # one inside a word becomes a space ("black-and-white" -> "black and white").
    delete = bool(_NUMBER_COMMA.search(text))
    out = text
    for p in PUNCTUATION:
        out = out.replace(p, "" if delete or f"{p} " in text or f" {p}" in text else " ")
    text = _PERIOD.sub("", out)
    words = [NUMBERS.get(w, w) for w in text.split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def soft_score(count: int) -> float:
    """ViLT's target for an answer ``count`` of the ten annotators gave: 0.3, 0.6, 0.9, then 1.0 from 4 on
    (Kim et al. 2021, ViLT, after the VQA accuracy's min(1, matches / 3))."""
    return (0.0, 0.3, 0.6, 0.9)[max(count, 0)] if count < 4 else 1.0


class AnswerVocab:
    """The answers a VQA head classifies over: normalised training answers given at least ``min_count`` times
    (ViLT: 9 on VQAv2, 3,129 classes), most frequent first, ties alphabetical (the order is reproducible)."""

    def __init__(self, answers: list[str]):
        self.answers = list(answers)
        self.index = {a: i for i, a in enumerate(self.answers)}
        if len(self.index) != len(self.answers):
            raise ValueError("AnswerVocab: answers repeat")

    @classmethod
    def build(cls, answer_lists: Iterable[list[str]], min_count: int = 9) -> AnswerVocab:
        counts = Counter(normalize_answer(a) for answers in answer_lists for a in answers)
        kept = sorted((a for a, c in counts.items() if c >= min_count and a), key=lambda a: (-counts[a], a))
        if not set(counts) - {""}:  # no answer at all: a lower min_count cannot help
            raise ValueError("AnswerVocab: no question has answers")
        if not kept:
            raise ValueError(f"AnswerVocab: no answer is given {min_count} times or more (lower min_count)")
        return cls(kept)

    def __len__(self) -> int:
        return len(self.answers)

    def targets(self, answers: list[str]) -> tuple[dict[int, float], int]:
        """One question's ten answers -> ({class: soft score}, how many answers are outside the vocabulary)."""
        counts = Counter(normalize_answer(a) for a in answers)
        inside = {self.index[a]: soft_score(c) for a, c in counts.items() if a in self.index}
        return inside, sum(c for a, c in counts.items() if a not in self.index)
