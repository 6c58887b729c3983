"""Weights in and out: our checkpoint format (`format`), reading a file (`load`: one ``torch.load`` policy), each
known file as our checkpoint (`files`), `transformers`' ViLT both ways (`hf`), the original dandelin/ViLT
checkpoints (`original`), timm's ViT (`vit`), and what turns images and text into a model's inputs, carried to an
export (`inputs`).

Every source is first turned into our checkpoint (`format`), which ``python -m vlm.convert`` writes and
``model.init_from`` reads. The names used elsewhere are re-exported here.
"""

from vlm.models.weights.files import from_original_vilt, init_from_vit, read_checkpoint, run_config
from vlm.models.weights.format import Checkpoint, build, checkpoint, heads_of, load_heads, load_into, save_checkpoint
from vlm.models.weights.hf import (
    from_hf_vilt,
    hf_checkpoint,
    hf_exportable,
    hf_head_name,
    hf_model,
    mlm_tied,
    to_hf_vilt,
)
from vlm.models.weights.inputs import export_entries, save_processor
from vlm.models.weights.load import PickledFile, load_file

__all__ = [
    "Checkpoint", "PickledFile", "build", "checkpoint", "export_entries", "from_hf_vilt", "from_original_vilt",
    "heads_of", "hf_checkpoint", "hf_exportable", "hf_head_name", "hf_model", "init_from_vit", "load_file",
    "load_heads", "load_into", "mlm_tied", "read_checkpoint", "run_config", "save_checkpoint", "save_processor",
    "to_hf_vilt",
]
