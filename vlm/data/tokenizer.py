"""Tokenizers: a BERT-style WordPiece trained on the data's own text, or any local `transformers` one.

Both come back as a `transformers` fast tokenizer, so word ids (for whole-word masking) and special
tokens work the same whichever is used.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

RESERVED = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train an uncased WordPiece with BERT's special tokens and save it where `load_tokenizer` finds it."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=RESERVED))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    fast.save_pretrained(tmp)
    tmp.replace(out) if not out.exists() else None
    return fast


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerFast:
    """A saved tokenizer directory, or the name of one in the local Hugging Face cache (never downloaded)."""
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(f"tokenizer {str(name_or_path)!r} is neither a directory nor in the local cache") from e
    if not tok.is_fast:
        raise ValueError(f"tokenizer {name_or_path!r} is not a fast tokenizer: whole-word masking needs word ids")
    if tok.mask_token_id is None or tok.cls_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} lacks [MASK] or [CLS]")
    return tok
