"""Data formats -> raw examples: one module per kind of layout, every public name importable from here
(``_target_: vlm.data.sources.WebDataset``).

- `base`: the `Source` contract and its raw examples, `Shard`, file patterns, `read_shard` (an unreadable shard
  costs that shard), `TableSource` (a metadata table cut into shards);
- `images`: webdataset tars, parquet, COCO Karpathy, imagefolder;
- `video`: WebVid, MSR-VTT;
- `downstream`: VQAv2, NLVR2 and the built-in scenes' questions and pair statements.
"""

from vlm.data.sources.base import (
    ExampleFiles,
    Shard,
    Source,
    TableSource,
    existing_files,
    expand_files,
    iter_rows,
    read_bytes,
    read_shard,
    source_classes,
)
from vlm.data.sources.downstream import NLVR2, JsonLines, SyntheticNLVR2, SyntheticVQA, VQAv2, nlvr2_label
from vlm.data.sources.images import CocoKarpathy, ImageFolder, Parquet, WebDataset
from vlm.data.sources.video import MSRVTT, WebVid

__all__ = [
    "MSRVTT", "NLVR2", "CocoKarpathy", "ExampleFiles", "ImageFolder", "JsonLines", "Parquet", "Shard", "Source",
    "SyntheticNLVR2", "SyntheticVQA", "TableSource", "VQAv2", "WebDataset", "WebVid", "existing_files", "expand_files",
    "iter_rows", "nlvr2_label", "read_bytes", "read_shard", "source_classes",
]
