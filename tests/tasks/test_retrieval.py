import pytest
import torch

from vlm.common import VisualInput
from vlm.models.embedders.patch import PatchEmbedder
from vlm.models.vilt import ViLT
from vlm.tasks.pretrain import PretrainLitModule
from vlm.tasks.ranking import recall_at, rerank_shortlists, score_pair_list, score_pairs


def test_recall_at_by_hand():
    # image i's true text is text i; rows: images, columns: texts
    scores = torch.tensor([[5.0, 1.0, 0.0], [2.0, 1.0, 3.0], [0.0, 9.0, 4.0]])
    r = recall_at(scores, ks=(1, 2))
    # images: 0 finds text 0 first; 1 ranks its text 3rd; 2 ranks its text 2nd
    assert r["tr_r1"] == pytest.approx(1 / 3) and r["tr_r2"] == pytest.approx(2 / 3)
    # texts: 0 finds image 0 first; 1 ranks image 1 2nd (9 > 1); 2 ranks image 2 1st (4 > 3 > 0)
    assert r["ir_r1"] == pytest.approx(2 / 3) and r["ir_r2"] == 1.0


def test_recall_at_with_several_texts_per_image_by_hand():
    # texts 0, 1 belong to image 0; texts 2, 3 to image 1 (a Karpathy split gives each image 5)
    owner = torch.tensor([0, 0, 1, 1])
    scores = torch.tensor([[1.0, 4.0, 5.0, 0.0],    # image 0: its best own text (4) is 2nd, behind text 2
                           [3.0, 2.0, 1.0, 0.5]])   # image 1: its best own text (1) is 3rd
    r = recall_at(scores, ks=(1, 2, 3), text_image=owner)
    assert (r["tr_r1"], r["tr_r2"], r["tr_r3"]) == (0.0, 0.5, 1.0)
    # texts: 0 ranks image 0 2nd (3 > 1); 1 1st (4 > 2); 2 ranks image 1 2nd (5 > 1); 3 1st (0.5 > 0)
    assert r["ir_r1"] == 0.5 and r["ir_r2"] == 1.0


def test_two_stage_with_k_at_least_n_ranks_exactly_as_exhaustive():
    g = torch.Generator().manual_seed(0)
    fine = torch.randn(7, 9, generator=g)
    coarse = fine + torch.randn(7, 9, generator=g)           # a noisy cheap scorer
    i2t, t2i, scored = rerank_shortlists(coarse, lambda i, t: fine[i, t], k=9)
    assert scored == 63
    owner = torch.arange(9) % 7
    for ks in [(1,), (1, 3, 5)]:
        assert recall_at(i2t, ks, owner, t2i) == recall_at(fine, ks, owner)
    assert torch.equal(i2t.argsort(1), fine.argsort(1)) and torch.equal(t2i.argsort(0), fine.argsort(0))


def test_two_stage_rescores_only_the_shortlists_each_pair_once():
    fine = torch.tensor([[0.0, 9.0, 1.0], [2.0, 0.0, 8.0], [7.0, 3.0, 0.0]])
    coarse = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [2.0, 1.0, 3.0]])  # every query's true pair first
    calls = []

    def score(i, t):
        calls.append(torch.stack([i, t], 1))
        return fine[i, t]

    i2t, t2i, scored = rerank_shortlists(coarse, score, k=1)
    assert scored == 3 and len(calls) == 1                  # both shortlists are the diagonal: 3 pairs, once
    assert recall_at(i2t, (1,), t2i=t2i) == {"tr_r1": 1.0, "ir_r1": 1.0}  # the cheap stage alone decides
    i2t, t2i, scored = rerank_shortlists(coarse, lambda i, t: fine[i, t], k=2)
    assert scored == 6          # images' top 2 texts: (0,0) (0,1) (1,1) (1,2) (2,2) (2,0); texts' top 2 images: the same
    # image 0 re-ranks texts {0, 1}: fine prefers 1 (9 > 0); text 2, outside its shortlist, stays below
    assert i2t[0].argmax() == 1 and i2t[0, 2] < i2t[0, 0]


def test_score_pair_list_is_score_pairs_at_those_pairs():
    torch.manual_seed(0)
    model = ViLT(PatchEmbedder(32, patch_size=8, image_size=32, max_tokens=-1), vocab_size=40, hidden_size=32,
                 num_layers=2, num_heads=4, dropout=0.0)
    task = PretrainLitModule(model).eval()
    visual = model.embedder(VisualInput(torch.randn(3, 3, 16, 24), torch.ones(3, 16, 24, dtype=torch.bool)))
    ids, attn = torch.randint(5, 40, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    full = score_pairs(task, visual, ids, attn, chunk=4)
    i, t = torch.tensor([2, 0, 1, 2]), torch.tensor([3, 1, 1, 0])
    torch.testing.assert_close(score_pair_list(task, visual, ids, attn, i, t, chunk=3), full[i, t])


def test_score_pairs_matches_one_pass_per_pair():
    torch.manual_seed(0)
    model = ViLT(PatchEmbedder(32, patch_size=8, image_size=32, max_tokens=-1), vocab_size=40, hidden_size=32,
                 num_layers=2, num_heads=4, dropout=0.0)
    task = PretrainLitModule(model).eval()
    images, pixel_mask = torch.randn(3, 3, 16, 24), torch.ones(3, 16, 24, dtype=torch.bool)
    pixel_mask[1, :, 16:] = False
    ids, attn = torch.randint(5, 40, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    attn[2, 4:] = 0
    visual = model.embedder(VisualInput(images, pixel_mask))
    scores = score_pairs(task, visual, ids, attn, chunk=5)
    for i in range(3):
        for t in range(4):
            out = model(ids[t : t + 1], attn[t : t + 1], VisualInput(images[i : i + 1], pixel_mask[i : i + 1]))
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
    scores = score_pairs(task, model.embedder(VisualInput(images, pixel_mask)), ids, attn, chunk=5, autocast=forward_context)
    assert len(entered) == 3 and scores.shape == (3, 4) and torch.isfinite(scores).all()  # 12 pairs, chunks of 5
