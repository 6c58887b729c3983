"""Weight interop against the reference implementation: transformers' ViLT, original checkpoints, timm's ViT.

Weights are drawn with a large spread (std 0.3, LayerNorm weights around 1) so that any miswired tensor
shows in the outputs; outputs must match within 3e-5 of the largest reference value, in eval mode.
"""

from __future__ import annotations

import pytest
import timm
import torch
import transformers
from hydra.utils import instantiate
from torch import nn
from transformers import ViltConfig

from vlm.common import VisualInput
from vlm.models import weights
from vlm.models.embedders.patch import PatchEmbedder
from vlm.models.heads import ITMHead, MLMHead, RankHead
from vlm.models.vilt import ViLT
from vlm.models.weights import from_hf_vilt, from_original_vilt, read_checkpoint, to_hf_vilt
from vlm.models.weights.format import vilt_config
from vlm.models.weights.hf import hf_config_to_ours


def started(model: ViLT, path) -> ViLT:
    """``model`` started from the weights at ``path``, as ``model.init_from=PATH`` does (`vlm.tasks.base.build_task`)."""
    weights.load_into(model, read_checkpoint(path), origin=str(path))
    return model

TOL = 3e-5
HF_CLASSES = ["ViltModel", "ViltForMaskedLM", "ViltForQuestionAnswering", "ViltForImageAndTextRetrieval",
              "ViltForImagesAndTextClassification"]


def spread(module: nn.Module, seed: int) -> nn.Module:
    """Weights with a large spread: N(0, 0.3) everywhere, LayerNorm weights N(1, 0.3)."""
    g = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in module.modules() if isinstance(m, nn.LayerNorm)}
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if id(p) in norms else 0.0))
    return module


def random_config(seed: int, **kw) -> ViltConfig:
    """A small ViLT config of its own: width, depth, heads, MLP width, patch and image size, vocabulary, text length."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    heads, patch = pick([2, 3, 4]), pick([8, 16])
    hidden = heads * pick([8, 12])
    cfg = dict(hidden_size=hidden, num_hidden_layers=pick([1, 2, 3]), num_attention_heads=heads,
               intermediate_size=hidden * pick([2, 4]), vocab_size=pick([37, 64, 101]),
               max_position_embeddings=pick([10, 14]), image_size=patch * pick([3, 4, 5]), patch_size=patch,
               num_labels=pick([3, 5]))
    cfg.update(kw)
    if "hidden_size" in kw:
        cfg["intermediate_size"] = 2 * kw["hidden_size"]
    return ViltConfig(**cfg)


def batch(c: ViltConfig, seed: int, n_images: int = 1):
    """Three examples: padded text of different lengths; images of different, non-square patch grids
    padded bottom/right to the batch's largest (as transformers' image processor does)."""
    g = torch.Generator().manual_seed(seed)
    p = c.patch_size
    grids = [(3, 5), (4, 2), (2, 3)]  # (rows, cols) of patches: the first has the most
    h, w = max(r for r, _ in grids) * p, max(q for _, q in grids) * p
    ids = torch.randint(0, c.vocab_size, (3, 9), generator=g)
    attn = torch.ones(3, 9, dtype=torch.long)
    attn[1, 6:] = 0
    attn[2, 4:] = 0
    pixels = torch.randn(3, n_images, 3, h, w, generator=g)
    mask = torch.zeros(3, n_images, h, w, dtype=torch.long)
    for i, (r, q) in enumerate(grids):
        for j in range(n_images):
            rr, qq = (r, q) if j == 0 else (q, r)  # the second image of a pair: the transposed grid
            mask[i, j, : rr * p, : qq * p] = 1
            pixels[i, j, :, rr * p :, :] = 0
            pixels[i, j, :, :, qq * p :] = 0
    return ids, attn, pixels, mask


def hf_reference(hf_vilt, ids, attn, pixels, mask, seed: int = 0, image_token_type_idx: int = 1):
    """transformers' outputs and, per visual position, the (row, col) of its patch.

    With every patch kept, transformers shuffles the patches of the images that have the most of them
    (``torch.multinomial``); seeding twice replays that shuffle, so ``visual_embed`` tells where each went.
    """
    torch.manual_seed(seed)
    _, vis_mask, (patch_index, _) = hf_vilt.embeddings.visual_embed(pixels, mask, max_image_length=-1)
    torch.manual_seed(seed)
    out = hf_vilt(input_ids=ids, attention_mask=attn, pixel_values=pixels, pixel_mask=mask,
                  image_token_type_idx=image_token_type_idx)
    return out, patch_index, vis_mask[:, 1:].bool()


def assert_same_positions(ours, ref, patch_index, ref_valid, attn, patch: int):
    """Every real position of ``ours`` against the reference: kept text, image CLS, each valid patch."""
    L = attn.shape[1]
    assert ours.last_hidden_state.shape == ref.last_hidden_state.shape  # [B, L + 1 + N, D]
    a_rows, b_rows = [], []
    for i in range(attn.shape[0]):
        keep = attn[i].bool()
        a_rows += [ours.last_hidden_state[i, :L][keep], ours.last_hidden_state[i, L : L + 1]]
        b_rows += [ref.last_hidden_state[i, :L][keep], ref.last_hidden_state[i, L : L + 1]]
        # our patches: raster order, located by their boxes; theirs: by patch_index
        mine = ours.image_mask[i, 1:]
        boxes = ours.image_boxes[i][mine]
        width = int(ref_valid.shape[1])  # any bound above the column count orders (row, col) the same
        our_key = (boxes[:, 1] // patch) * width + boxes[:, 0] // patch
        their_key = patch_index[i][ref_valid[i]][:, 0] * width + patch_index[i][ref_valid[i]][:, 1]
        assert sorted(our_key.long().tolist()) == sorted(their_key.tolist())  # the same set of patches
        a_rows.append(ours.last_hidden_state[i, L + 1 :][mine][our_key.argsort()])
        b_rows.append(ref.last_hidden_state[i, L + 1 :][ref_valid[i]][their_key.argsort()])
    a, b = torch.cat(a_rows), torch.cat(b_rows)
    assert_close_rel(a, b)
    assert_close_rel(ours.pooler_output, ref.pooler_output)


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err <= tol, f"max |diff| is {err:.2e} of the largest reference value (tolerance {tol:.0e})"


def make_hf(arch: str, seed: int, **kw):
    extra = {"num_images": 2, "modality_type_vocab_size": 3} if arch == "ViltForImagesAndTextClassification" else {}
    config = random_config(seed, **extra, **kw)
    config.id2label = {i: f"answer {i}" for i in range(config.num_labels)}
    return spread(getattr(transformers, arch)(config), seed).eval()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_from_hf_matches_transformers_on_every_real_position(seed):
    hf = make_hf("ViltModel", seed)
    model, heads = from_hf_vilt(hf)
    model.eval()
    assert heads == {}
    ids, attn, pixels, mask = batch(hf.config, seed)
    pixels, mask = pixels[:, 0], mask[:, 0]
    with torch.no_grad():
        ref, patch_index, valid = hf_reference(hf, ids, attn, pixels, mask, seed)
        ours = model(ids, attn, VisualInput(pixels, mask.bool()))
    assert_same_positions(ours, ref, patch_index, valid, attn, hf.config.patch_size)


def test_task_heads_match_transformers():
    """MLM logits on kept text, VQA and rank logits on the pooled output, as transformers computes them."""
    for arch, seed in [("ViltForMaskedLM", 3), ("ViltForQuestionAnswering", 4), ("ViltForImageAndTextRetrieval", 5)]:
        hf = make_hf(arch, seed)
        model, heads = from_hf_vilt(hf)
        model.eval()
        ids, attn, pixels, mask = batch(hf.config, seed)
        pixels, mask = pixels[:, 0], mask[:, 0]
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=attn, pixel_values=pixels, pixel_mask=mask).logits
            out = model(ids, attn, VisualInput(pixels, mask.bool()))
            if arch == "ViltForMaskedLM":
                keep = attn.bool()
                assert_close_rel(heads["mlm_score"](out.text_states)[keep], ref[keep])
            else:
                (name,) = heads
                assert_close_rel(heads[name](out.pooler_output), ref)


def test_nlvr2_pair_matches_transformers():
    """Two passes, modality types 1 and 2, pooled outputs concatenated into the pair classifier."""
    hf = make_hf("ViltForImagesAndTextClassification", 6)
    model, heads = from_hf_vilt(hf)
    model.eval()
    ids, attn, pixels, mask = batch(hf.config, 6, n_images=2)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=attn, pixel_values=pixels, pixel_mask=mask).logits
        pooled = [model(ids, attn, VisualInput(pixels[:, j], mask[:, j].bool()), image_token_type=j + 1).pooler_output
                  for j in range(2)]
        assert_close_rel(heads["nlvr2_classifier"](torch.cat(pooled, -1)), ref)
        # the second image's pass position by position
        ref2, patch_index, valid = hf_reference(hf.vilt, ids, attn, pixels[:, 1], mask[:, 1], 6, image_token_type_idx=2)
        ours2 = model(ids, attn, VisualInput(pixels[:, 1], mask[:, 1].bool()), image_token_type=2)
    assert_same_positions(ours2, ref2, patch_index, valid, attn, hf.config.patch_size)


@pytest.mark.parametrize("arch", HF_CLASSES)
def test_round_trip_reproduces_the_state_dict_exactly(arch):
    hf = make_hf(arch, 7)
    back = to_hf_vilt(*from_hf_vilt(hf))
    assert type(back) is type(hf)
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    arch_keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "image_size", "patch_size", "modality_type_vocab_size", "layer_norm_eps",
                 "qkv_bias", "max_image_length", "num_channels", "hidden_act"]
    if arch in ("ViltForQuestionAnswering", "ViltForImagesAndTextClassification"):
        arch_keys += ["id2label", "num_images"]
    assert {k: getattr(back.config, k) for k in arch_keys} == {k: getattr(hf.config, k) for k in arch_keys}


def test_saved_directory_round_trip(tmp_path):
    hf = make_hf("ViltForQuestionAnswering", 8)
    hf.save_pretrained(tmp_path / "hf")
    model, heads = from_hf_vilt(tmp_path / "hf")
    assert set(heads) == {"vqa_classifier"}
    back = to_hf_vilt(model, heads)
    for k, v in hf.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_our_model_exported_matches_transformers():
    """to_hf_vilt from a model of ours (not one that came from transformers), compared position by position."""
    emb = PatchEmbedder(hidden_size=36, patch_size=8, image_size=40, max_tokens=-1)
    model = spread(ViLT(emb, vocab_size=50, hidden_size=36, num_layers=2, num_heads=3, mlp_ratio=2.0, max_text_len=12,
                        dropout=0.1, layer_norm_eps=1e-12, text_layer_norm_eps=1e-12), 9).eval()
    hf = to_hf_vilt(model)
    assert isinstance(hf, transformers.ViltModel) and hf.config.num_attention_heads == 3
    ids, attn, pixels, mask = batch(hf.config, 9)
    pixels, mask = pixels[:, 0], mask[:, 0]
    with torch.no_grad():
        ref, patch_index, valid = hf_reference(hf, ids, attn, pixels, mask, 9)
        ours = model(ids, attn, VisualInput(pixels, mask.bool()))
    assert_same_positions(ours, ref, patch_index, valid, attn, 8)


def test_mlm_export_refuses_untied_decoder():
    hf = make_hf("ViltForMaskedLM", 10)
    model, heads = from_hf_vilt(hf)
    with torch.no_grad():
        heads["mlm_score"].decoder.weight.add_(1.0)
    with pytest.raises(ValueError, match="ties mlm_score.decoder.weight"):
        to_hf_vilt(model, heads)
    assert isinstance(to_hf_vilt(model), transformers.ViltModel)  # without the head it exports


def original_layout(hf: transformers.ViltForMaskedLM, itm: ITMHead) -> dict:
    """An original dandelin/ViLT checkpoint of the same weights, written out key by key (the dandelin/ViLT names)."""
    s, L = hf.state_dict(), hf.config.num_hidden_layers
    e = "vilt.embeddings."
    out = {
        "text_embeddings.word_embeddings.weight": s[e + "text_embeddings.word_embeddings.weight"],
        "text_embeddings.position_embeddings.weight": s[e + "text_embeddings.position_embeddings.weight"],
        "text_embeddings.token_type_embeddings.weight": s[e + "text_embeddings.token_type_embeddings.weight"],
        "text_embeddings.LayerNorm.weight": s[e + "text_embeddings.LayerNorm.weight"],
        "text_embeddings.LayerNorm.bias": s[e + "text_embeddings.LayerNorm.bias"],
        "text_embeddings.position_ids": torch.arange(hf.config.max_position_embeddings)[None],
        "token_type_embeddings.weight": s[e + "token_type_embeddings.weight"],
        "transformer.cls_token": s[e + "cls_token"],
        "transformer.pos_embed": s[e + "position_embeddings"],
        "transformer.patch_embed.proj.weight": s[e + "patch_embeddings.projection.weight"],
        "transformer.patch_embed.proj.bias": s[e + "patch_embeddings.projection.bias"],
        "transformer.norm.weight": s["vilt.layernorm.weight"],
        "transformer.norm.bias": s["vilt.layernorm.bias"],
        "pooler.dense.weight": s["vilt.pooler.dense.weight"],
        "pooler.dense.bias": s["vilt.pooler.dense.bias"],
        "itm_score.fc.weight": itm.fc.weight.detach(),
        "itm_score.fc.bias": itm.fc.bias.detach(),
        "mlm_score.transform.dense.weight": s["mlm_score.transform.dense.weight"],
        "mlm_score.transform.dense.bias": s["mlm_score.transform.dense.bias"],
        "mlm_score.transform.LayerNorm.weight": s["mlm_score.transform.LayerNorm.weight"],
        "mlm_score.transform.LayerNorm.bias": s["mlm_score.transform.LayerNorm.bias"],
        "mlm_score.decoder.weight": s["mlm_score.decoder.weight"],
        "mlm_score.bias": s["mlm_score.decoder.bias"],
    }
    for i in range(L):
        h, t = f"vilt.encoder.layer.{i}.", f"transformer.blocks.{i}."
        for w in ("weight", "bias"):
            out[t + f"attn.qkv.{w}"] = torch.cat([s[h + f"attention.attention.{p}.{w}"] for p in ("query", "key", "value")])
            out[t + f"norm1.{w}"] = s[h + f"layernorm_before.{w}"]
            out[t + f"attn.proj.{w}"] = s[h + f"attention.output.dense.{w}"]
            out[t + f"norm2.{w}"] = s[h + f"layernorm_after.{w}"]
            out[t + f"mlp.fc1.{w}"] = s[h + f"intermediate.dense.{w}"]
            out[t + f"mlp.fc2.{w}"] = s[h + f"output.dense.{w}"]
    return out


def test_original_checkpoint_imports(tmp_path):
    """A Lightning checkpoint in the original layout, written here, reads into the same weights, heads and
    outputs; LayerNorm epsilons are the original code's."""
    hf = make_hf("ViltForMaskedLM", 11)
    itm = spread(ITMHead(hf.config.hidden_size), 12)
    path = tmp_path / "vilt_mlm_itm.ckpt"
    torch.save({"state_dict": original_layout(hf, itm), "epoch": 3,
                "hyper_parameters": {"config": {"num_heads": hf.config.num_attention_heads, "drop_rate": 0.1,
                                                "max_image_len": 200}}}, path)
    model, heads = from_original_vilt(path)
    assert set(heads) == {"itm_score", "mlm_score"}
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6
    assert model.text_embeddings.LayerNorm.eps == 1e-12 and model.embedder.max_tokens == 200
    torch.testing.assert_close(heads["itm_score"].fc.weight, itm.fc.weight, rtol=0, atol=0)
    expect, expect_heads = from_hf_vilt(hf)  # the same weights through the other importer
    for k, v in expect.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    for k, v in expect_heads["mlm_score"].state_dict().items():
        assert torch.equal(heads["mlm_score"].state_dict()[k], v), k
    # and it computes what transformers computes (the epsilons differ by 1e-6: far inside the tolerance)
    model.eval()
    ids, attn, pixels, mask = batch(hf.config, 11)
    pixels, mask = pixels[:, 0], mask[:, 0]
    with torch.no_grad():
        ref, patch_index, valid = hf_reference(hf.vilt, ids, attn, pixels, mask, 11)
        ours = model(ids, attn, VisualInput(pixels, mask.bool()))
    assert_same_positions(ours, ref, patch_index, valid, attn, hf.config.patch_size)


def test_original_checkpoint_without_head_count_needs_one(tmp_path):
    hf = make_hf("ViltForMaskedLM", 13)
    path = tmp_path / "v.ckpt"
    torch.save({"state_dict": original_layout(hf, ITMHead(hf.config.hidden_size))}, path)
    with pytest.raises(ValueError, match="num_heads"):
        from_original_vilt(path)
    model, _ = from_original_vilt(path, num_heads=hf.config.num_attention_heads)
    assert model.blocks[0].attn.num_heads == hf.config.num_attention_heads


def small_vit(img_size: int = 64, seed: int = 14) -> nn.Module:
    vit = timm.create_model("vit_base_patch32_384", pretrained=False, img_size=img_size, embed_dim=48, depth=2,
                            num_heads=4)
    return spread(vit, seed).eval()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_vit_initialises_transformer_and_patch_projection(tmp_path, suffix):
    vit = small_vit()  # 2 x 2 grid of 32-pixel patches; our model has 3 x 3
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save(vit.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    model = started(ViLT(PatchEmbedder(48, patch_size=32, image_size=96), vocab_size=30, hidden_size=48, num_layers=2,
                         num_heads=4), path).eval()
    fresh = ViLT(PatchEmbedder(48, patch_size=32, image_size=96), vocab_size=30, hidden_size=48, num_layers=2, num_heads=4)
    torch.testing.assert_close(model.embedder.proj.weight, vit.patch_embed.proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.cls_token, vit.cls_token, rtol=0, atol=0)
    from timm.layers import resample_abs_pos_embed

    torch.testing.assert_close(model.embedder.pos_embed, resample_abs_pos_embed(vit.pos_embed, [3, 3], [2, 2]))
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        ours = model.norm(torch.nn.Sequential(*model.blocks)(x))
        theirs = vit.norm(vit.blocks(x))
    assert_close_rel(ours, theirs)
    # the text side, the modality types and the pooler are left to their initialisation
    assert model.text_embeddings.word_embeddings.weight.shape == fresh.text_embeddings.word_embeddings.weight.shape
    assert model.text_embeddings.LayerNorm.weight.eq(1).all() and model.pooler.dense.bias.eq(0).all()


def test_init_from_checks_the_architecture(tmp_path):
    hf = make_hf("ViltModel", 15, num_attention_heads=4, hidden_size=32)
    path = tmp_path / "ours.pt"
    weights.save_checkpoint(weights.hf_checkpoint(hf), path)
    cfg = hf_config_to_ours(hf.config)
    emb = PatchEmbedder(32, patch_size=cfg["embedder"]["patch_size"], image_size=cfg["embedder"]["image_size"])
    kwargs = dict(vocab_size=cfg["vocab_size"], hidden_size=32, num_layers=cfg["num_layers"], mlp_ratio=cfg["mlp_ratio"],
                  max_text_len=cfg["max_text_len"], layer_norm_eps=1e-12)
    with pytest.raises(ValueError, match="num_heads=4, the model num_heads=2: set model.num_heads=4"):
        started(ViLT(emb, num_heads=2, **kwargs), path)
    with pytest.raises(ValueError, match="layer_norm_eps"):
        started(ViLT(emb, num_heads=4, **{**kwargs, "layer_norm_eps": 1e-6}), path)
    model = started(ViLT(emb, num_heads=4, **kwargs), path)
    for k, v in read_checkpoint(path)["state_dict"].items():
        assert torch.equal(model.state_dict()[k.removeprefix("model.")], v), k


def test_unknown_files_fail_with_one_line(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a checkpoint this project reads"):
        read_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_checkpoint(tmp_path / "missing.pt")


def test_rank_head_starts_from_the_itm_match_row():
    itm = spread(ITMHead(16), 16)
    rank = RankHead.from_itm(itm)
    x = torch.randn(5, 16)
    torch.testing.assert_close(rank(x)[:, 0], itm(x)[:, 1])


def test_mlm_head_eps_is_kept():
    hf = make_hf("ViltForMaskedLM", 17, layer_norm_eps=1e-7)
    _, heads = from_hf_vilt(hf)
    assert isinstance(heads["mlm_score"], MLMHead) and heads["mlm_score"].transform.LayerNorm.eps == 1e-7


def test_init_from_reads_every_source(tmp_path):
    """init_from with a transformers directory, an original .ckpt and our checkpoint: the same weights."""
    hf = make_hf("ViltForMaskedLM", 18)
    hf.save_pretrained(tmp_path / "hf")
    torch.save({"state_dict": original_layout(hf, ITMHead(hf.config.hidden_size))}, tmp_path / "orig.ckpt")
    weights.save_checkpoint(weights.hf_checkpoint(hf), tmp_path / "ours.pt")
    expect, _ = from_hf_vilt(hf)
    cfg = vilt_config(expect)
    for source, eps in [("hf", 1e-12), ("orig.ckpt", 1e-6), ("ours.pt", 1e-12)]:
        model = started(instantiate({**cfg, "layer_norm_eps": eps}), tmp_path / source)
        for k, v in expect.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), (source, k)


def test_the_pickle_refusal_keeps_torchs_reason_whole(tmp_path):
    """torch's reason for refusing a pickled object, whole and on one line: not cut mid-word, no terminal escapes."""
    import argparse

    from vlm.models.weights import PickledFile, load_file

    torch.save({"weights": torch.zeros(2), "args": argparse.Namespace(lr=1)}, tmp_path / "x.pt")
    with pytest.raises(PickledFile) as e:
        load_file(tmp_path / "x.pt")
    assert "(Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default); " in str(e.value)
    assert "\x1b" not in str(e.value) and "\n" not in str(e.value)
    assert load_file(tmp_path / "x.pt", trust_pickle=True)["args"].lr == 1


def test_every_head_a_task_holds_is_saved_built_and_started_from():
    """A task's `Head` attributes are its checkpoint's heads, each written as the node it declares (ITC's and MPP's
    as much as ITM's), built again from it, read off the weights alone where a file records no nodes, and started
    from by name; what is not a head (a plain parameter) is not."""
    from vlm.models.heads import ITCHead, MPPHead
    from vlm.models.weights.format import build, checkpoint, heads_in, heads_of, load_heads

    def task(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        t = nn.Module()
        t.model = ViLT(PatchEmbedder(16, patch_size=8, image_size=16), vocab_size=30, hidden_size=16, num_layers=1,
                       num_heads=2)
        t.itm_score, t.itc, t.mpp_score = ITMHead(16), ITCHead(16, dim=8), MPPHead(16, num_classes=5, eps=1e-7)
        t.mask_token = nn.Parameter(torch.zeros(16))
        return t

    ours = task(0)
    ckpt = checkpoint(ours.model, heads_of(ours))
    assert ckpt["heads"] == {
        "itm_score": {"_target_": "vlm.models.heads.ITMHead", "hidden_size": 16},
        "itc": {"_target_": "vlm.models.heads.ITCHead", "hidden_size": 16, "dim": 8},
        "mpp_score": {"_target_": "vlm.models.heads.MPPHead", "hidden_size": 16, "num_classes": 5, "eps": 1e-7}}
    assert heads_in(ckpt["state_dict"], 16, eps=1e-7) == ckpt["heads"]
    _, heads = build(ckpt)
    assert torch.equal(heads["itc"].text.weight, ours.itc.text.weight)
    other = task(1)
    assert load_heads(other, ckpt) == ["itm_score", "itc", "mpp_score"]
    for key, value in ours.state_dict().items():
        if not key.startswith(("model.", "mask_token")):
            assert torch.equal(other.state_dict()[key], value), key
    assert not torch.equal(other.model.cls_token, ours.model.cls_token)  # the model is load_into's, not load_heads'
