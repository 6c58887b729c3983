"""The image layouts: webdataset tars (img2dataset's, which may hold videos too), parquet, COCO's Karpathy splits,
and `datasets`' imagefolder."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from math import ceil
from pathlib import Path
from typing import Literal

from datasets import Features, Image, Value, load_dataset
from datasets.packaged_modules.webdataset.webdataset import WebDataset as _HFWebDataset

from vlm.data.sources.base import ExampleFiles, Shard, Source, TableSource, existing_files, iter_rows


class _TarShards(_HFWebDataset):
    """`datasets`' webdataset builder with no field decoding: it json-decodes inside its own generator, where
    one malformed ``KEY.json`` ends the whole shard. We decode the fields per sample instead."""

    DECODERS = {}


def _decode_text(data) -> str | None:
    if data is None or isinstance(data, str):
        return data
    return bytes(data).decode("utf-8", errors="replace")


class WebDataset(Source):
    """Tar shards of ``KEY.<image ext>`` or ``KEY.<video ext>`` + ``KEY.json`` (+ ``KEY.txt``), as img2dataset,
    video2dataset and vlm.data.synthetic write; a shard may hold both images and videos.

    The caption is ``KEY.<text_ext>`` when present, else the ``caption_key`` field of ``KEY.json``; boxes (pixel
    xyxy) and their labels come from ``boxes_key`` / ``labels_key`` of ``KEY.json`` when present. A sample
    with no image whose json ``status_key`` is not ``success`` is a failed download (img2dataset).
    """

    skip_reasons = ("failed_download", "bad_json")  # img2dataset's status; a KEY.json that is not an object

    @classmethod
    def write_examples(cls, out, sizes, shards=1, seed=0, failed=0.0, corrupt=0.0) -> ExampleFiles:
        """img2dataset's tars (`vlm.data.export.write_webdataset`)."""
        from vlm.data.export import write_webdataset

        return ExampleFiles({split: write_webdataset(out, split, n, shards if split == "train" else 1, seed, failed,
                                                     corrupt) for split, n in sizes.items()}, {})

    def __init__(
        self,
        caption_key: str = "caption",
        text_ext: str = "txt",
        image_exts: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        boxes_key: str = "boxes",
        labels_key: str = "labels",
        status_key: str = "status",
        video_exts: Sequence[str] = ("mp4", "webm", "mkv", "avi", "mov"),
    ):
        self.caption_key, self.text_ext, self.image_exts = caption_key, text_ext, tuple(image_exts)
        self.video_exts = tuple(video_exts)
        self.boxes_key, self.labels_key, self.status_key = boxes_key, labels_key, status_key
        features = {"__key__": Value("string"), "__url__": Value("string"), "json": Value("binary"), text_ext: Value("binary")}
        features.update({ext: Image(decode=False) for ext in self.image_exts})
        features.update({ext: Value("binary") for ext in self.video_exts})
        self.features = Features(features)

    def shards(self, files, split: str) -> list[Shard]:
        return [Shard(f) for f in existing_files(files)]

    def read(self, shard: Shard) -> Iterator[dict]:
        builder = _TarShards(data_files={"train": [shard.file]}, features=self.features)
        for ex in iter_rows(builder.as_streaming_dataset("train")):
            key = ex["__key__"]
            meta: dict = {}
            if ex.get("json") is not None:
                try:
                    meta = json.loads(_decode_text(ex["json"]))
                except ValueError:
                    meta = None
                if not isinstance(meta, dict):
                    yield {"key": key, "bad": "bad_json"}
                    continue
            image = next((ex[e] for e in self.image_exts if ex.get(e) is not None), None)
            video = next((ex[e] for e in self.video_exts if ex.get(e) is not None), None)
            if image is None and video is None:
                status = meta.get(self.status_key)
                yield {"key": key, "bad": "failed_download" if status not in (None, "success") else "missing_image"}
                continue
            text = _decode_text(ex.get(self.text_ext))
            out = {"key": key, "text": meta.get(self.caption_key) if text is None else text}
            if image is not None:
                out["image"] = image["bytes"]
            else:
                out["video"] = bytes(video)
            if self.boxes_key in meta:
                out["boxes"] = meta[self.boxes_key]
                out["box_labels"] = meta.get(self.labels_key)
            used = (self.caption_key, self.boxes_key, self.labels_key, self.status_key)
            out["extra"] = {k: v for k, v in meta.items() if k not in used}
            yield out


class Parquet(Source):
    """Parquet files with an image column and a caption column; every row group is a shard.

    The image column may hold `datasets`' Image struct (``{bytes, path}``, what the Hub's parquet files
    hold), raw bytes, or a path (relative to ``image_root``, default: the parquet file's folder). Keys come
    from ``key_column`` when set, else ``<file stem>-<row group>-<row>``.
    """

    @classmethod
    def write_examples(cls, out, sizes, shards=1, seed=0, failed=0.0, corrupt=0.0) -> ExampleFiles:
        """Hub-style parquet files, keys in a ``key`` column (`vlm.data.export.write_parquet`)."""
        from vlm.data.export import write_parquet

        return ExampleFiles({split: write_parquet(out, split, n, shards if split == "train" else 1, seed=seed,
                                                  failed=failed, corrupt=corrupt) for split, n in sizes.items()},
                            {"key_column": "key"})

    def __init__(
        self,
        image_column: str = "image",
        caption_column: str = "caption",
        key_column: str | None = None,
        image_root: str | None = None,
        boxes_column: str | None = None,
        labels_column: str | None = None,
    ):
        self.image_column, self.caption_column, self.key_column = image_column, caption_column, key_column
        self.image_root, self.boxes_column, self.labels_column = image_root, boxes_column, labels_column

    def shards(self, files, split: str) -> list[Shard]:
        import pyarrow.parquet as pq

        out: list[Shard] = []
        for f in existing_files(files):
            try:
                meta = pq.ParquetFile(f)
            except Exception:  # unreadable: kept as one shard, whose read fails and is counted then
                out.append(Shard(f))
                continue
            names = meta.schema_arrow.names
            missing = [c for c in self._columns() if c not in names]
            if missing:  # a wrong key in the config, not a bad file: say so at start
                raise KeyError(f"{f}: no column {missing[0]!r} (columns: {', '.join(names)})")
            out += [Shard(f, g) for g in range(meta.num_row_groups)]
        return out

    def _columns(self) -> list[str]:
        return [c for c in (self.image_column, self.caption_column, self.key_column, self.boxes_column,
                            self.labels_column) if c]

    def describe(self, shard: Shard) -> str:
        return f"{shard.file} (row group {shard.part})"

    def read(self, shard: Shard) -> Iterator[dict]:
        path, group = shard.file, shard.part
        columns = self._columns()
        ds = load_dataset("parquet", data_files={"train": [path]}, split="train", streaming=True)
        missing = [c for c in columns if c not in ds.features]
        if missing:
            raise KeyError(f"no column {missing[0]!r} (columns: {', '.join(ds.features)})")
        ds = ds.select_columns(columns)
        if isinstance(ds.features[self.image_column], Image):
            ds = ds.cast_column(self.image_column, Image(decode=False))
        ds = ds.reshard()
        ds = ds.shard(num_shards=ds.num_shards, index=group)
        stem = os.path.splitext(os.path.basename(path))[0]
        root = self.image_root or os.path.dirname(path)
        for i, row in enumerate(iter_rows(ds)):
            key = str(row[self.key_column]) if self.key_column else f"{stem}-{group}-{i}"
            out = {"key": key, "text": row[self.caption_column]}
            image = row[self.image_column]
            if isinstance(image, dict):  # datasets' Image struct
                image = image.get("bytes") or image.get("path")
            if isinstance(image, str):
                out["image_path"] = os.path.join(root, image)
            else:
                out["image"] = image
            if self.boxes_column and row[self.boxes_column] is not None:
                out["boxes"] = row[self.boxes_column]
                out["box_labels"] = row[self.labels_column] if self.labels_column else None
            yield out


class CocoKarpathy(TableSource):
    """Karpathy's ``dataset_coco.json`` + the COCO image folders; ``files`` is the json.

    ``per="caption"``: one sample per caption (key ``<cocoid>-<sentid>``); ``per="image"``: one sample per
    image with all its captions (``text`` is the list; training draws one per epoch). ``splits`` maps the
    data module's split to Karpathy's (train takes ``restval`` too, as usual: 113K images). Images are at
    ``image_root/<filepath>/<filename>`` (``image_root`` defaults to the json's folder).
    """

    @classmethod
    def write_examples(cls, out, sizes, shards=1, seed=0, failed=0.0, corrupt=0.0) -> ExampleFiles:
        """One ``dataset_coco.json`` for every split (``sizes``: images of Karpathy's splits), five captions an image
        (`vlm.data.export.write_coco_karpathy`); the train split's images in ``shards`` shards."""
        from vlm.data.export import write_coco_karpathy

        path = write_coco_karpathy(out, sizes, seed=seed, failed=failed, corrupt=corrupt)
        rows = ceil(max(1, sizes.get("train", 1)) / shards)
        return ExampleFiles({split: path for split in sizes},
                            {"rows_per_shard": rows, "cache_dir": str(Path(out) / "hf-cache")})

    def __init__(
        self,
        image_root: str | None = None,
        per: Literal["caption", "image"] = "caption",
        splits: dict[str, list[str]] | None = None,
        rows_per_shard: int = 500,
        cache_dir: str | None = None,
    ):
        super().__init__(rows_per_shard, cache_dir)
        if per not in ("caption", "image"):
            raise ValueError(f"per must be 'caption' or 'image', got {per!r}")
        self.image_root, self.per = image_root, per
        splits = splits or {"train": ["train", "restval"], "val": ["val"], "test": ["test"]}
        self.splits = {k: list(v) for k, v in splits.items()}

    def load(self, path: str, split: str) -> tuple:
        if split not in self.splits:
            raise KeyError(f"{path}: no Karpathy split given for {split!r} (splits: {self.splits})")
        ds = load_dataset("json", data_files=path, field="images", split="train", cache_dir=self.cache_dir)
        for column in ("filename", "split", "sentences"):
            if column not in ds.column_names:
                raise KeyError(f"{path}: images have no {column!r} field: not a Karpathy split file")
        wanted = set(self.splits[split])
        return ds, [i for i, s in enumerate(ds["split"]) if s in wanted]

    def read(self, shard: Shard) -> Iterator[dict]:
        root = self.image_root or os.path.dirname(shard.file)
        for img in self.rows(shard):
            image_id = str(img.get("cocoid") if img.get("cocoid") is not None else img.get("imgid"))
            path = os.path.join(root, img.get("filepath") or "", img["filename"] or "")
            sentences = img.get("sentences") or []
            if self.per == "image":
                yield {"key": image_id, "image_path": path, "text": [s.get("raw") for s in sentences] or None}
            elif not sentences:
                yield {"key": image_id, "bad": "missing_caption"}
            else:
                for s in sentences:
                    yield {"key": f"{image_id}-{s.get('sentid')}", "image_path": path, "text": s.get("raw")}


class ImageFolder(TableSource):
    """`datasets`' imagefolder layout: images beside a ``metadata.jsonl`` or ``metadata.csv`` whose
    ``file_name`` column is relative to it, plus a caption column; ``files`` are the metadata files.
    Keys come from ``key_column`` when set, else the image's path relative to the metadata file; boxes
    (pixel xyxy) from ``boxes_column`` when set."""

    @classmethod
    def write_examples(cls, out, sizes, shards=1, seed=0, failed=0.0, corrupt=0.0) -> ExampleFiles:
        """``<split>/images/`` + ``<split>/metadata.jsonl`` (`vlm.data.export.write_imagefolder`); the train split
        in ``shards`` shards."""
        from vlm.data.export import write_imagefolder

        rows = ceil(max(1, sizes.get("train", 1)) / shards)
        return ExampleFiles({split: write_imagefolder(out, split, n, seed=seed, failed=failed, corrupt=corrupt)
                             for split, n in sizes.items()},
                            {"rows_per_shard": rows, "cache_dir": str(Path(out) / "hf-cache")})

    def __init__(self, caption_column: str = "text", key_column: str | None = None, boxes_column: str | None = None,
                 labels_column: str | None = None, rows_per_shard: int = 1000, cache_dir: str | None = None):
        super().__init__(rows_per_shard, cache_dir)
        self.caption_column, self.key_column = caption_column, key_column
        self.boxes_column, self.labels_column = boxes_column, labels_column

    def load(self, path: str, split: str) -> tuple:
        ds = load_dataset("imagefolder", data_files=[path], split="train", cache_dir=self.cache_dir)
        for column in (self.caption_column, self.key_column, self.boxes_column, self.labels_column):
            if column and column not in ds.column_names:
                raise KeyError(f"{path}: no column {column!r} (columns: {', '.join(ds.column_names)})")
        ds = ds.cast_column("image", Image(decode=False))
        return ds, list(range(len(ds)))

    def read(self, shard: Shard) -> Iterator[dict]:
        folder = os.path.dirname(shard.file)
        for row in self.rows(shard):
            path = (row["image"] or {}).get("path")
            key = str(row[self.key_column]) if self.key_column else os.path.relpath(path or "", folder)
            out = {"key": key, "text": row[self.caption_column]}
            if path:
                out["image_path"] = path
            else:
                out["image"] = None
            if self.boxes_column and row[self.boxes_column] is not None:
                out["boxes"] = row[self.boxes_column]
                out["box_labels"] = row[self.labels_column] if self.labels_column else None
            yield out
