import numpy as np
import pytest
import torch

from vlm.common import IGNORE, real_extent
from vlm.data.collate import (
    Collator,
    ImageCollator,
    PretrainCollator,
    itm_negatives,
    pad_images,
    whole_word_mask,
)
from vlm.data.sample import Sample
from vlm.data.tokenizer import train_wordpiece

WORDS = "a small red circle to the left of an enormous purplish triangle above the unremarkable bluegreen squares".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    # a small vocabulary so that long words split into several word pieces
    texts = [" ".join(np.random.default_rng(i).permutation(WORDS)[:8]) for i in range(200)]
    return train_wordpiece(texts, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=80)


def test_pad_images_bottom_right_with_mask():
    a, b = torch.ones(3, 4, 6), 2 * torch.ones(3, 8, 2)
    images, mask = pad_images([a, b])
    assert images.shape == (2, 3, 8, 6) and mask.shape == (2, 8, 6)
    assert mask[0, :4, :6].all() and not mask[0, 4:].any()
    assert mask[1, :, :2].all() and not mask[1, :, 2:].any()
    assert torch.equal(images[0, :, :4, :6], a) and images[0, :, 4:].abs().sum() == 0
    assert torch.equal(images[1, :, :, :2], b) and images[1, :, :, 2:].abs().sum() == 0


def test_whole_word_masking_rate_grouping_and_80_10_10(tokenizer):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.permutation(WORDS)) for _ in range(400)]
    enc = tokenizer(texts, padding="longest", return_tensors="pt")
    word_ids = [enc.word_ids(i) for i in range(len(texts))]
    special = set(tokenizer.all_special_ids)
    masked, labels = whole_word_mask(
        enc["input_ids"], word_ids, rng, tokenizer.mask_token_id, special, len(tokenizer), prob=0.15
    )
    chosen = labels != IGNORE
    real = torch.tensor([[w is not None for w in ws] for ws in word_ids])
    budget = (real.sum(1) * 0.15).round().clamp(min=1)
    assert (chosen.sum(1) <= budget).all()  # never more than BERT's budget of round(15%) of the tokens
    rate = chosen.sum() / real.sum()
    assert 0.12 < rate <= 0.15, rate
    assert not chosen[~real].any()  # never [CLS], [SEP] or padding
    split_words = 0
    for row, ws in enumerate(word_ids):  # a word's pieces are masked together or not at all
        groups: dict[int, list[bool]] = {}
        for pos, w in enumerate(ws):
            if w is not None:
                groups.setdefault(w, []).append(bool(chosen[row, pos]))
        for flags in groups.values():
            assert all(flags) or not any(flags)
            split_words += len(flags) > 1
    assert split_words > 100  # the test exercises multi-piece words
    assert torch.equal(labels[chosen], enc["input_ids"][chosen])
    n = chosen.sum().item()
    to_mask = (masked[chosen] == tokenizer.mask_token_id).sum().item() / n
    kept = (masked[chosen] == enc["input_ids"][chosen]).sum().item() / n
    assert 0.75 < to_mask < 0.85 and 0.06 < kept < 0.14, (to_mask, kept)
    assert torch.equal(masked[~chosen], enc["input_ids"][~chosen])


def test_itm_negatives_half_with_another_image():
    rng = np.random.default_rng(0)
    for n in (2, 7, 64):
        index, labels = itm_negatives(n, rng, 0.5)
        assert labels.sum() == n - n // 2
        assert torch.equal(index[labels == 1], torch.arange(n)[labels == 1])
        neg = labels == 0
        assert (index[neg] != torch.arange(n)[neg]).all()
        assert ((index >= 0) & (index < n)).all()
    index, labels = itm_negatives(1, rng, 0.5)
    assert labels.tolist() == [1] and index.tolist() == [0]


def test_collator_builds_a_batch(tokenizer):
    samples = [Sample(f"k{i}", torch.randn(3, 8 * (i + 1), 16), " ".join(WORDS[: 3 + i]),
                      boxes=torch.tensor([[0.0, 0, 4, 4]]), box_labels=torch.tensor([1])) for i in range(4)]
    batch = PretrainCollator(tokenizer, max_text_len=10)(samples, np.random.default_rng(0))
    assert batch.keys == ["k0", "k1", "k2", "k3"]
    assert batch.images.shape == (4, 3, 32, 16) and batch.pixel_mask.shape == (4, 32, 16)
    assert batch.input_ids.shape[1] <= 10 and batch.input_ids.shape == batch.mlm_ids.shape == batch.mlm_labels.shape
    assert (batch.mlm_labels != IGNORE).any(dim=1).all()
    assert batch.itm_labels.sum() == 2 and len(batch.boxes) == 4
    moved = batch.to("cpu")
    assert moved.keys == batch.keys and torch.equal(moved.images, batch.images)


def test_each_collate_makes_only_what_its_task_reads(tokenizer):
    """Detection's batch has no text (no tokenizer is needed), the plain collate no pretraining masks."""
    samples = [Sample(f"k{i}", torch.randn(3, 16, 16), "a red circle.", boxes=torch.tensor([[0.0, 0, 4, 4]]),
                      box_labels=torch.tensor([2])) for i in range(3)]
    images = ImageCollator()(samples, np.random.default_rng(0))
    assert images.input_ids is None and images.mlm_ids is None and images.box_labels[0].tolist() == [2]
    text = Collator(tokenizer)(samples, np.random.default_rng(0))
    assert text.input_ids.shape[0] == 3 and text.mlm_ids is None and text.itm_labels is None
    h, w = real_extent(pad_images([torch.zeros(3, 8, 16), torch.zeros(3, 16, 4)])[1])
    assert h.tolist() == [8, 16] and w.tolist() == [16, 4]
