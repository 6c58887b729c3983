"""Visual embedders: pixels (and boxes) in, a padded sequence of visual tokens out."""

from vlm.models.embedders.base import VisualEmbedder, VisualInput, VisualTokens

__all__ = ["VisualEmbedder", "VisualInput", "VisualTokens"]
