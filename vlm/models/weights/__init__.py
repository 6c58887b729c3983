"""Weights in and out: our checkpoint format (`format`), reading files (`files`: one ``torch.load`` policy),
`transformers`' ViLT both ways (`hf`), the original dandelin/ViLT checkpoints (`original`), timm's ViT (`vit`).

Every source is first turned into our checkpoint (`format`), which ``python -m vlm.convert`` writes and
``model.init_from`` reads. The names used elsewhere are re-exported here.
"""

from vlm.models.weights.files import from_original_vilt, init_from_vit, load_file, read_checkpoint, run_config
from vlm.models.weights.format import Checkpoint, build, checkpoint, load_heads, load_into, save_checkpoint
from vlm.models.weights.hf import from_hf_vilt, hf_checkpoint, hf_model, mlm_tied, to_hf_vilt

__all__ = [
    "Checkpoint", "build", "checkpoint", "from_hf_vilt", "from_original_vilt", "hf_checkpoint", "hf_model",
    "init_from_vit", "load_file", "load_heads", "load_into", "mlm_tied", "read_checkpoint", "run_config",
    "save_checkpoint", "to_hf_vilt",
]
