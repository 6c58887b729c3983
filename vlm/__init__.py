"""vlm: single-stream vision-and-language transformers (ViLT) on Lightning and Hydra, built to compare visual embedders."""

from omegaconf import OmegaConf

from vlm.precision import resolve

# `${precision:auto}` in a config: bf16-mixed where it is fast here, else 32-true (vlm/precision.py)
OmegaConf.register_new_resolver("precision", resolve, replace=True)
