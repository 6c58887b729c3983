import pytest
import torch

from vlm.common import VisualInput
from vlm.models.embedders.patch import PatchEmbedder
from vlm.models.vilt import ViLT
from vlm.tasks.base import build_model


def tiny(**kw) -> ViLT:
    emb = PatchEmbedder(hidden_size=32, patch_size=8, image_size=32, max_tokens=-1)
    return ViLT(emb, vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, max_text_len=12, **kw)


def test_output_layout_and_masks():
    torch.manual_seed(0)
    model = tiny().eval()
    ids = torch.randint(5, 50, (2, 7))
    attn = torch.ones(2, 7, dtype=torch.long)
    attn[1, 5:] = 0
    pixel_mask = torch.zeros(2, 24, 40, dtype=torch.bool)
    pixel_mask[0] = True
    pixel_mask[1, :16, :24] = True
    out = model(ids, attn, VisualInput(torch.randn(2, 3, 24, 40), pixel_mask))
    n = 3 * 5  # the largest number of real patches in the batch
    assert out.last_hidden_state.shape == (2, 7 + 1 + n, 32)
    assert out.pooler_output.shape == (2, 32)
    assert out.text_states.shape == (2, 7, 32) and out.image_states.shape == (2, 1 + n, 32)
    assert out.image_mask.sum(1).tolist() == [1 + 15, 1 + 6]
    assert out.text_mask.sum(1).tolist() == [7, 5]


def test_the_model_takes_one_visual_input_or_tokens_embedded_beforehand():
    torch.manual_seed(0)
    model = tiny().eval()
    ids, attn = torch.randint(5, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    inputs = VisualInput(torch.randn(2, 3, 24, 40))  # no pixel mask: every pixel is real
    with torch.no_grad():
        once = model(ids, attn, inputs)
        before = model(ids, attn, visual=model.embedder(inputs))
    torch.testing.assert_close(once.last_hidden_state, before.last_hidden_state, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one of them"):
        model(ids, attn)
    with pytest.raises(ValueError, match="one of them"):
        model(ids, attn, inputs, visual=model.embedder(inputs))
    with pytest.raises(TypeError, match="^PatchEmbedder takes one VisualInput"):
        model(ids, attn, inputs.images)


def test_padding_does_not_change_real_positions():
    """Padded text and padded image area are invisible: same outputs as the unpadded example alone."""
    torch.manual_seed(0)
    model = tiny().eval()
    ids = torch.randint(5, 50, (1, 6))
    image = torch.randn(1, 3, 16, 24)
    alone = model(ids, torch.ones(1, 6), VisualInput(image, torch.ones(1, 16, 24, dtype=torch.bool)))
    ids_pad = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    attn_pad = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], 1)
    image_pad = torch.zeros(1, 3, 32, 40).normal_()
    image_pad[:, :, :16, :24] = image
    mask_pad = torch.zeros(1, 32, 40, dtype=torch.bool)
    mask_pad[:, :16, :24] = True
    padded = model(ids_pad, attn_pad, VisualInput(image_pad, mask_pad))
    real_text = padded.text_states[:, :6]
    real_image = padded.image_states[:, : 1 + 6]
    torch.testing.assert_close(real_text, alone.text_states, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(real_image, alone.image_states, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(padded.pooler_output, alone.pooler_output, atol=1e-5, rtol=1e-4)


def test_text_longer_than_position_table_is_an_error():
    with pytest.raises(ValueError, match="max_text_len"):
        tiny()(torch.ones(1, 13, dtype=torch.long), torch.ones(1, 13), VisualInput(torch.randn(1, 3, 8, 8)))


def test_vilt_base_has_the_parameters_of_transformers_vilt():
    """model=vilt_base is ViLT-B/32: exactly as many parameters as transformers' ViltModel(ViltConfig())."""
    from transformers import ViltConfig, ViltModel

    from tests.conftest import compose_config

    ours, _ = build_model(compose_config(["model=vilt_base"]).model)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in ViltModel(ViltConfig()).parameters())
    assert n_ours == n_hf
    assert round(n_ours / 1e6, 1) == 111.6
    assert ours.text_embeddings.word_embeddings.weight.numel() == 30522 * 768  # 23.4 M


def test_compiled_blocks_compute_what_eager_blocks_do():
    """model.compile=true changes the kernels, not the function, the gradients or the parameter names."""
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(0)
    eager = tiny(dropout=0.0)
    torch.manual_seed(0)
    compiled = tiny(dropout=0.0, compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    ids = torch.randint(5, 50, (2, 7))
    attn = torch.ones(2, 7, dtype=torch.long)
    attn[1, 5:] = 0  # padded: the blocks take a mask
    images, pixel_mask = torch.randn(2, 3, 24, 40), torch.ones(2, 24, 40, dtype=torch.bool)
    outs = []
    for model in (eager, compiled):
        out = model(ids, attn, VisualInput(images, pixel_mask))
        (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
        outs.append((out.last_hidden_state, model.blocks[0].attn.qkv.weight.grad))
    (h, g), (hc, gc) = outs
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, the one graph shared by both blocks
    torch.testing.assert_close(hc, h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gc, g, rtol=1e-4, atol=1e-6)
