import pytest
import torch

from vlm.models.embedders.patch import PatchEmbedder
from vlm.models.vilt import ViLT
from vlm.tasks.pretrain import PretrainLitModule
from vlm.tasks.retrieval import recall_at, score_pairs


def test_recall_at_by_hand():
    # image i's true text is text i; rows: images, columns: texts
    scores = torch.tensor([[5.0, 1.0, 0.0], [2.0, 1.0, 3.0], [0.0, 9.0, 4.0]])
    r = recall_at(scores, ks=(1, 2))
    # images: 0 finds text 0 first; 1 ranks its text 3rd; 2 ranks its text 2nd
    assert r["tr_r1"] == pytest.approx(1 / 3) and r["tr_r2"] == pytest.approx(2 / 3)
    # texts: 0 finds image 0 first; 1 ranks image 1 2nd (9 > 1); 2 ranks image 2 1st (4 > 3 > 0)
    assert r["ir_r1"] == pytest.approx(2 / 3) and r["ir_r2"] == 1.0


def test_score_pairs_matches_one_pass_per_pair():
    torch.manual_seed(0)
    model = ViLT(PatchEmbedder(32, patch_size=8, image_size=32, max_tokens=-1), vocab_size=40, hidden_size=32,
                 num_layers=2, num_heads=4, dropout=0.0)
    task = PretrainLitModule(model).eval()
    images, pixel_mask = torch.randn(3, 3, 16, 24), torch.ones(3, 16, 24, dtype=torch.bool)
    pixel_mask[1, :, 16:] = False
    ids, attn = torch.randint(5, 40, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    attn[2, 4:] = 0
    visual = model.embedder(images, pixel_mask)
    scores = score_pairs(task, visual, ids, attn, chunk=5)
    for i in range(3):
        for t in range(4):
            out = model(ids[t : t + 1], attn[t : t + 1], images[i : i + 1], pixel_mask[i : i + 1])
            logit = task.itm_score(out.pooler_output)[0]
            torch.testing.assert_close(scores[i, t], logit[1] - logit[0], atol=1e-5, rtol=1e-4)


def test_score_pairs_enters_a_fresh_precision_context_per_chunk():
    """The trainer's forward_context is a one-shot context manager: every chunk needs a new one."""
    from contextlib import contextmanager

    entered = []

    @contextmanager
    def forward_context():
        entered.append(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield

    model = ViLT(PatchEmbedder(32, patch_size=8, image_size=32, max_tokens=-1), vocab_size=40, hidden_size=32,
                 num_layers=2, num_heads=4, dropout=0.0)
    task = PretrainLitModule(model).eval()
    images, pixel_mask = torch.randn(3, 3, 16, 24), torch.ones(3, 16, 24, dtype=torch.bool)
    ids, attn = torch.randint(5, 40, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    scores = score_pairs(task, model.embedder(images, pixel_mask), ids, attn, chunk=5, autocast=forward_context)
    assert len(entered) == 3 and scores.shape == (3, 4) and torch.isfinite(scores).all()  # 12 pairs, chunks of 5
