"""ViLT: one transformer over [text tokens; image CLS; visual tokens] (Kim et al. 2021, ViLT, §3.1).

The same module runs whichever visual embedder feeds it, which is what makes an embedder comparison
fair. Names follow the original ViLT / timm ViT (``blocks.{i}.attn.qkv``, ``norm1``, ...) so ViT and
ViLT weights load by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from torch.nn.attention.flex_attention import BlockMask, flex_attention

from vlm.models.embedders.base import VisualEmbedder, VisualInput, VisualTokens
from vlm.models.packing import Packing, PackedLayout, drop_tokens, fit_to

_COMPILED_FLEX = []


def _flex_attention(mask: BlockMask):
    """FlexAttention, compiled once when the mask was built for compiled use (eager: a reference implementation)."""
    if not getattr(mask, "compiled", False):
        return flex_attention
    if not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(flex_attention))
    return _COMPILED_FLEX[0]


@dataclass
class ViltOutput:
    """``last_hidden_state`` is [B, L + 1 + N, D]: L text positions, the image CLS, N visual tokens."""

    last_hidden_state: Tensor
    pooler_output: Tensor
    text_mask: Tensor  # [B, L]
    image_mask: Tensor  # [B, 1 + N], the image CLS included
    image_boxes: Tensor | None = None  # [B, N, 4] pixel extent of each visual token, where it has one

    @property
    def text_len(self) -> int:
        return self.text_mask.shape[1]

    @property
    def text_states(self) -> Tensor:
        return self.last_hidden_state[:, : self.text_len]

    @property
    def image_states(self) -> Tensor:
        """[B, 1 + N, D]: the image CLS, then the visual tokens."""
        return self.last_hidden_state[:, self.text_len :]


class TextEmbeddings(nn.Module):
    """BERT embeddings: word + learned position + token type (always 0), LayerNorm, dropout."""

    def __init__(self, vocab_size: int, hidden_size: int, max_len: int, eps: float, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_len, hidden_size)
        self.token_type_embeddings = nn.Embedding(2, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor) -> Tensor:
        n = input_ids.shape[1]
        if n > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of {n} tokens is longer than max_text_len={self.position_embeddings.num_embeddings}")
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:n] + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class Attention(TimmAttention):
    """timm's attention (fused qkv, same parameter names), with its layout and kernel chosen for speed.

    q, k and v are views of the qkv projection laid out [B, N, 3, H, d], so the backward pass writes
    their gradients back in that layout with one copy (timm's [3, B, H, N, d] permute costs two). On
    the CPU in bf16 it computes softmax(QK^T)V itself, where SDPA's CPU kernel is the slower one (docs/benchmarks.md,
    Speed against transformers); in fp32 and on GPUs SDPA is the faster one.
    """

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if is_causal:
            raise ValueError("ViLT's attention is bidirectional: is_causal is not supported")
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, N, d] views
        if isinstance(attn_mask, BlockMask):  # packed rows (vlm.models.packing): FlexAttention skips empty blocks
            x = _flex_attention(attn_mask)(q, k, v, block_mask=attn_mask)
            return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))
        bf16 = x.dtype == torch.bfloat16 or (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
        if x.device.type == "cpu" and bf16:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn.masked_fill(~attn_mask, torch.finfo(attn.dtype).min)
            x = self.attn_drop(attn.softmax(-1)) @ v
        else:
            dropout = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Pooler(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class ViLT(nn.Module):
    """ViLT's transformer (Kim et al. 2021, §3.1) over whichever embedder it is given.

    Built from fresh weights; ``model.init_from`` starts it from a checkpoint, read by the task's factory
    (`vlm.tasks.base.build_task`, through `vlm.models.weights`).

    ``compile``: run each transformer block through ``torch.compile`` (one graph, shared by every block;
    the embedder stays eager, its token sampling is data-dependent). It fuses what lies between the
    matmuls (LayerNorm, GELU, softmax, casts); parameter names and checkpoints are unchanged. The first
    steps, and each new kind of batch shape, pay for compilation.
    """

    # arguments that leave the weights as they are (a resumed run may change them, `vlm.resume`)
    free_on_resume = frozenset({"vocab_size", "dropout", "compile"})

    def __init__(
        self,
        embedder: VisualEmbedder,
        vocab_size: Annotated[int, Ge(1)],
        hidden_size: Annotated[int, Ge(1)] = 768,
        num_layers: Annotated[int, Ge(1)] = 12,
        num_heads: Annotated[int, Ge(1)] = 12,
        mlp_ratio: Annotated[float, Gt(0)] = 4.0,
        max_text_len: Annotated[int, Ge(2)] = 40,
        dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.1,
        layer_norm_eps: Annotated[float, Gt(0)] = 1e-6,
        text_layer_norm_eps: Annotated[float, Gt(0)] = 1e-12,
        qkv_bias: bool = True,
        num_modality_types: Annotated[int, Ge(2)] = 2,
        compile: bool = False,
        packing: Packing | None = None,
    ):
        super().__init__()
        self.packing = packing if isinstance(packing, Packing) else Packing(**dict(packing or {}))
        if self.packing.enabled and self.packing.seq_len < max_text_len + 2:
            raise ValueError(f"packing.seq_len={self.packing.seq_len} cannot hold a text of max_text_len={max_text_len}, "
                             "the image CLS and a visual token")
        if self.packing.enabled and self.packing.too_long == "refuse":
            most = max_text_len + 1 + embedder.max_tokens
            if embedder.max_tokens <= 0 or self.packing.seq_len < most:
                raise ValueError(f"packing.too_long=refuse: an example may have {max_text_len} text tokens, the "
                                 f"image CLS and {embedder.max_tokens if embedder.max_tokens > 0 else 'unbounded'} "
                                 f"visual tokens (model.embedder.max_tokens), more than model.packing.seq_len="
                                 f"{self.packing.seq_len}: raise seq_len, cap max_tokens, or too_long=truncate")
        # tokens the blocks ran on, real and in all, and visual tokens truncated: the task logs and resets them
        self.stats = {"real": 0, "slots": 0, "truncated": 0}
        if embedder.hidden_size != hidden_size:
            raise ValueError(f"embedder.hidden_size={embedder.hidden_size} differs from hidden_size={hidden_size}")
        self.hidden_size = hidden_size
        self.text_embeddings = TextEmbeddings(vocab_size, hidden_size, max_text_len, text_layer_norm_eps, dropout)
        self.embedder = embedder
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.token_type_embeddings = nn.Embedding(num_modality_types, hidden_size)  # modality: 0 text, 1 image
        self.pos_drop = nn.Dropout(dropout)
        norm = partial(nn.LayerNorm, eps=layer_norm_eps)
        self.blocks = nn.ModuleList(
            Block(
                hidden_size, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=dropout, attn_drop=dropout,
                norm_layer=norm, attn_layer=Attention,
            )
            for _ in range(num_layers)
        )
        if compile:
            self.compile_blocks()
        self.norm = norm(hidden_size)
        self.pooler = Pooler(hidden_size)
        for child in self.children():  # the embedder initialises itself (and may hold loaded weights)
            if child is not embedder:
                child.apply(init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def compile_blocks(self) -> None:
        """``torch.compile`` each transformer block in place (what ``compile=True`` does)."""
        for block in self.blocks:
            block.compile()

    def embed_image(self, visual: VisualTokens, token_type: int = 1) -> tuple[Tensor, Tensor]:
        """[image CLS; visual tokens] with the modality type added: ([B, 1 + N, D], mask [B, 1 + N])."""
        b = visual.embeds.shape[0]
        cls = self.cls_token.expand(b, -1, -1)
        if visual.cls_pos is not None:
            cls = cls + visual.cls_pos
        x = torch.cat([cls.to(visual.embeds.dtype), visual.embeds], dim=1)
        x = self.pos_drop(x) + self.token_type_embeddings.weight[token_type]
        mask = torch.cat([visual.mask.new_ones(b, 1), visual.mask], dim=1)
        return x, mask

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        visual_input: VisualInput | None = None,
        visual: VisualTokens | None = None,
        image_token_type: int = 1,
    ) -> ViltOutput:
        """Over ``visual_input``, what the embedder reads (`VisualInput`: a batch's ``visual_input()``), or ``visual``,
        its tokens embedded beforehand (one embedding shown to several texts)."""
        if (visual_input is None) == (visual is None):
            raise ValueError("ViLT takes visual_input (what the embedder reads) or visual (tokens embedded beforehand): "
                             "one of them")
        if visual is None:
            visual = self.embedder(visual_input)
        text = self.text_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        image, image_mask = self.embed_image(visual, image_token_type)
        text_mask = attention_mask.bool()
        x = torch.cat([text.to(image.dtype), image], dim=1)
        if self.packing.enabled:
            if self.training and self.packing.token_drop > 0:
                image_mask = drop_tokens(image_mask, self.packing.token_drop)
            # the rows are planned on the host (their sizes are shapes): one copy of the masks there, none back
            host = torch.cat([text_mask, image_mask], dim=1).cpu()
            n_text = text_mask.shape[1]
            kept, truncated = fit_to(host[:, n_text:], host[:, :n_text].sum(1), self.packing.seq_len)
            if truncated:
                self.stats["truncated"] += truncated
                host = torch.cat([host[:, :n_text], kept], dim=1)
                image_mask = kept.to(image_mask.device, non_blocking=True)
            x = self.packed_blocks(x, host)
            mask = torch.cat([text_mask, image_mask], dim=1)
        else:
            mask = torch.cat([text_mask, image_mask], dim=1)
            self.stats["slots"] += mask.numel()
            # keys that may be attended to, for every query and head; none to mask: no mask, the faster kernels
            attn_mask = None if bool(mask.all()) else mask[:, None, None, :]
            for block in self.blocks:
                x = block(x, attn_mask=attn_mask)
        self.stats["real"] += mask.sum()  # a tensor: no host sync per forward; read when the step is logged
        x = self.norm(x)
        return ViltOutput(
            last_hidden_state=x,
            pooler_output=self.pooler(x),
            text_mask=text_mask,
            image_mask=image_mask,
            image_boxes=visual.boxes,
        )


    def packed_blocks(self, x: Tensor, mask: Tensor) -> Tensor:
        """The blocks over ``x`` [B, T, D] packed into rows (`vlm.models.packing`), back in the padded layout;
        ``mask`` [B, T], the real tokens, on the host or the device."""
        layout = PackedLayout.of(mask, self.packing.seq_len, self.packing.max_per_seq)
        self.stats["slots"] += layout.shape[0] * layout.shape[1]
        # On a CPU FlexAttention has no backward pass (torch 2.14), and eager it is the unfused reference (every
        # score materialised, the mask evaluated pair by pair; 10x SDPA's time a layer): there it serves
        # compiled evaluation only, and otherwise the dense mask computes the same outputs.
        cpu = x.device.type == "cpu"
        flex = self.packing.attention == "flex" and not (cpu and (torch.is_grad_enabled() or not self.packing.compile_flex))
        if flex:
            attn_mask = layout.block_mask()
            attn_mask.compiled = self.packing.compile_flex
        else:
            attn_mask = layout.dense_mask()
        packed = layout.pack(x)
        for block in self.blocks:
            packed = block(packed, attn_mask=attn_mask)
        return layout.unpack(packed, *mask.shape)

    def unimodal(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                 visual: VisualTokens | None = None) -> Tensor:
        """The transformer over one modality alone, the text or the visual tokens: its CLS state [B, D] after
        the final norm. What a dual-encoder score (retrieval's first stage) compares: each side once."""
        if visual is None:
            x = self.text_embeddings(input_ids) + self.token_type_embeddings.weight[0]
            mask = attention_mask.bool()
        else:
            x, mask = self.embed_image(visual)
        attn_mask = None if bool(mask.all()) else mask[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return self.norm(x[:, 0])

    def add_modality_type(self) -> int:
        """One more modality type, starting from the image row (ViLT's NLVR2: the second image); its index."""
        old = self.token_type_embeddings
        new = nn.Embedding(old.num_embeddings + 1, old.embedding_dim).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight[:-1] = old.weight
            new.weight[-1] = old.weight[1]
        self.token_type_embeddings = new
        return new.num_embeddings - 1


def init_weights(module: nn.Module) -> None:
    """ViLT's initialisation for new modules: N(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()
