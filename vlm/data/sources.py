"""Data formats -> raw examples, read through Hugging Face `datasets`.

A source knows one layout on disk and nothing else. ``shards(files, split)`` lists the units that can be
read on their own — a tar, a parquet row group, a slice of a metadata table — as `Shard`s, and
``read(shard)`` yields that unit's raw examples::

    {"key": str, "image": bytes | None, "image_path": str (instead of bytes), "text": str | list[str] | None,
     "video": bytes, "video_path": str (a video instead of an image, `vlm.data.video`),
     "boxes": [[x1, y1, x2, y2], ...], "box_labels": [...], "extra": {the record's other fields}, "bad": reason,
     "image2" / "image2_path": a second image (NLVR2's pair)}

Which shards a worker reads and in which order is `ShardStream`'s business, and decoding is
`vlm.data.decode`'s: a source never decodes an image, so one broken file costs one sample. A source marks
what it can already tell is unusable (a failed download, a malformed json) with ``bad`` instead of raising.
"""

from __future__ import annotations

import glob
import json
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from math import ceil
from typing import Literal, NamedTuple

from datasets import Dataset, Features, Image, Value, load_dataset
from datasets.packaged_modules.webdataset.webdataset import WebDataset as _HFWebDataset
from datasets.utils.logging import disable_progress_bar

from vlm.errors import DataWarning

disable_progress_bar()


class Shard(NamedTuple):
    """A unit read on its own: a tar, a parquet row group, a slice of a metadata table."""

    file: str
    part: int = 0  # row group or slice number
    split: str = ""  # the split selected inside a split-tagged file (Karpathy's json)


_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_files(spec: str | Sequence[str]) -> list[str]:
    """Globs and ``{00000..00099}`` brace ranges (zero padding kept), in order, duplicates removed."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        m = _BRACES.search(s)
        if m:
            lo, hi = m.group(1), m.group(2)
            width = len(lo) if lo.startswith("0") else 0
            for k in range(int(lo), int(hi) + 1):
                out += expand_files(s[: m.start()] + str(k).zfill(width) + s[m.end() :])
            continue
        matches = sorted(glob.glob(os.path.expanduser(s))) if glob.has_magic(s) else [os.path.expanduser(s)]
        out += matches
    seen: set[str] = set()
    return [f for f in out if not (f in seen or seen.add(f))]


def existing_files(spec: str | Sequence[str]) -> list[str]:
    """`expand_files`, or FileNotFoundError naming the first pattern or file that is not there."""
    files = expand_files(spec)
    if not files:
        raise FileNotFoundError(f"no file matches {spec!r}")
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"no such file: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return files


def iter_rows(dataset, chunk: int = 64) -> Iterator[dict]:
    """Rows of a `datasets` dataset, read in this process whether or not it is a DataLoader worker.

    (Plain iteration of an `IterableDataset` inside a worker makes `datasets` split the shards among workers
    again: with our one-shard view, every worker but one would then read nothing.)
    """
    for rows in dataset.iter(batch_size=chunk):
        names = list(rows)
        for values in zip(*(rows[n] for n in names)):
            yield dict(zip(names, values))


def read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class Source(ABC):
    """One layout on disk: lists its shards and reads one shard's raw examples."""

    @abstractmethod
    def shards(self, files: str | Sequence[str], split: str) -> list[Shard]:
        """The readable units of ``files``; ``split`` (train / val / test) matters to split-tagged layouts only."""

    @abstractmethod
    def read(self, shard: Shard) -> Iterator[dict]:
        """Raw examples of one shard, in file order. Raises only when the shard as a whole cannot be read."""

    def describe(self, shard: Shard) -> str:
        return shard.file

    def texts(self, shards: Sequence[Shard], limit: int = 200_000) -> Iterator[str]:
        """Captions in shard order, for training a tokenizer; read as the stream reads (`read_shard`)."""
        n = 0
        for shard in shards:
            for ex in read_shard(self, shard):
                text = ex.get("text")
                for t in text if isinstance(text, list) else [text]:
                    if isinstance(t, str) and t.strip():
                        yield t
                        n += 1
                        if n >= limit:
                            return


def read_shard(source: Source, shard: Shard) -> list[dict]:
    """Every raw example of one shard, or one ``{"bad": "unreadable_shard"}`` example (and a warning) when the
    shard as a whole cannot be read: a broken file costs that file, never the stream or the tokenizer."""
    try:
        return list(source.read(shard))
    except Exception as e:
        warnings.warn(f"skipping unreadable shard {source.describe(shard)}: {type(e).__name__}: {e}", DataWarning,
                      stacklevel=2)
        return [{"key": source.describe(shard), "bad": "unreadable_shard"}]


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


class _TableSource(Source):
    """A metadata table loaded once into `datasets`' Arrow cache (memory-mapped, shared by all workers) and
    cut into shards of ``rows_per_shard`` rows; images are read from their paths only when a sample is used."""

    def __init__(self, rows_per_shard: int = 1000, cache_dir: str | None = None):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.rows_per_shard, self.cache_dir = rows_per_shard, cache_dir
        self._tables: dict[tuple[str, str], tuple] = {}

    def __getstate__(self):  # workers open the (cached) tables themselves
        return {**self.__dict__, "_tables": {}}

    @abstractmethod
    def _load(self, path: str, split: str) -> tuple:
        """(dataset, its row indices that belong to ``split``) for one metadata file."""

    def _table(self, path: str, split: str) -> tuple:
        if (path, split) not in self._tables:
            self._tables[(path, split)] = self._load(path, split)
        return self._tables[(path, split)]

    def shards(self, files, split: str) -> list[Shard]:
        out: list[Shard] = []
        for f in existing_files(files):
            rows = self._table(f, split)[1]
            out += [Shard(f, k, split) for k in range(ceil(len(rows) / self.rows_per_shard))]
        return out

    def describe(self, shard: Shard) -> str:
        lo = shard.part * self.rows_per_shard
        return f"{shard.file} (rows {lo}-{lo + self.rows_per_shard - 1})"

    def rows(self, shard: Shard) -> Iterator[dict]:
        ds, rows = self._table(shard.file, shard.split)
        lo = shard.part * self.rows_per_shard
        yield from iter_rows(ds.select(rows[lo : lo + self.rows_per_shard]))


class CocoKarpathy(_TableSource):
    """Karpathy's ``dataset_coco.json`` + the COCO image folders; ``files`` is the json.

    ``per="caption"``: one sample per caption (key ``<cocoid>-<sentid>``); ``per="image"``: one sample per
    image with all its captions (``text`` is the list; training draws one per epoch). ``splits`` maps the
    data module's split to Karpathy's (train takes ``restval`` too, as usual: 113K images). Images are at
    ``image_root/<filepath>/<filename>`` (``image_root`` defaults to the json's folder).
    """

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

    def _load(self, path: str, split: str) -> tuple:
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


class ImageFolder(_TableSource):
    """`datasets`' imagefolder layout: images beside a ``metadata.jsonl`` or ``metadata.csv`` whose
    ``file_name`` column is relative to it, plus a caption column; ``files`` are the metadata files.
    Keys come from ``key_column`` when set, else the image's path relative to the metadata file; boxes
    (pixel xyxy) from ``boxes_column`` when set."""

    def __init__(self, caption_column: str = "text", key_column: str | None = None, boxes_column: str | None = None,
                 labels_column: str | None = None, rows_per_shard: int = 1000, cache_dir: str | None = None):
        super().__init__(rows_per_shard, cache_dir)
        self.caption_column, self.key_column = caption_column, key_column
        self.boxes_column, self.labels_column = boxes_column, labels_column

    def _load(self, path: str, split: str) -> tuple:
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


class WebVid(_TableSource):
    """WebVid-10M's metadata CSVs (``videoid``, ``name``: the caption, ``page_dir``; other columns unused) + the
    downloaded videos; ``files`` are the CSVs. A row's video is ``video_root/<page_dir>/<videoid>.<video_ext>``
    (the download script's folders) where that exists, else ``video_root/<videoid>.<video_ext>`` (a flat folder);
    ``video_root`` defaults to the CSV's folder. A row whose video is in neither place keeps the first path: most
    of WebVid's links are dead, and the stream counts each as missing_video rather than this source stat-ing
    10M files at start."""

    def __init__(self, video_root: str | None = None, video_ext: str = "mp4", id_column: str = "videoid",
                 caption_column: str = "name", folder_column: str | None = "page_dir", rows_per_shard: int = 1000,
                 cache_dir: str | None = None):
        super().__init__(rows_per_shard, cache_dir)
        self.video_root, self.video_ext = video_root, video_ext
        self.id_column, self.caption_column, self.folder_column = id_column, caption_column, folder_column

    def _load(self, path: str, split: str) -> tuple:
        as_text = {c: str for c in (self.id_column, self.folder_column) if c}  # ids keep leading zeros
        ds = load_dataset("csv", data_files=[path], split="train", cache_dir=self.cache_dir, converters=as_text)
        for column in (self.id_column, self.caption_column, self.folder_column):
            if column and column not in ds.column_names:
                raise KeyError(f"{path}: no column {column!r} (columns: {', '.join(ds.column_names)})")
        return ds, list(range(len(ds)))

    def read(self, shard: Shard) -> Iterator[dict]:
        root = self.video_root or os.path.dirname(shard.file)
        for row in self.rows(shard):
            key, text = row[self.id_column], row[self.caption_column]
            if text is None or text == "":
                yield {"key": key, "bad": "missing_caption"}
                continue
            name = f"{key}.{self.video_ext}"
            folder = row[self.folder_column] if self.folder_column else None
            candidates = ([os.path.join(root, folder, name)] if folder else []) + [os.path.join(root, name)]
            path = next((p for p in candidates if os.path.exists(p)), candidates[0])
            yield {"key": key, "video_path": path, "text": text}


class MSRVTT(_TableSource):
    """MSR-VTT for retrieval with the 9k / 1k-A split (JSFusion's test list, as CLIP4Clip, Frozen in Time and
    All-in-One report): ``files`` is ``MSRVTT_data.json`` (``sentences``: video_id, caption, sen_id), and the split
    lists are CSVs beside it — ``train_csv`` (a ``video_id`` column: 9,000 videos with their 20 captions each) and
    ``test_csv`` (``video_id``, ``sentence``: 1,000 videos with one caption each, the pairs everyone scores).
    ``splits`` maps the data module's split to a list (``train`` or ``test``; MSR-VTT 9k has no val list).

    ``per="caption"``: one sample per caption (key ``<video_id>-<sen_id>``; the test list's key is the video id);
    ``per="video"``: one sample per video with all its captions (``text`` is the list), what retrieval scores.
    Videos are ``video_root/<video_id>.mp4``; ``video_root`` defaults to ``videos/all`` beside the json (the
    archive's layout) when that folder exists, else the json's folder.
    """

    def __init__(self, video_root: str | None = None, train_csv: str = "MSRVTT_train.9k.csv",
                 test_csv: str = "MSRVTT_JSFUSION_test.csv", splits: dict[str, str] | None = None,
                 per: Literal["caption", "video"] = "caption", rows_per_shard: int = 500, cache_dir: str | None = None):
        super().__init__(rows_per_shard, cache_dir)
        if per not in ("caption", "video"):
            raise ValueError(f"per must be 'caption' or 'video', got {per!r}")
        self.splits = dict(splits or {"train": "train", "val": "test", "test": "test"})
        wrong = {k: v for k, v in self.splits.items() if v not in ("train", "test")}
        if wrong:
            raise ValueError(f"MSR-VTT splits name the train or test list, got {wrong}")
        self.video_root, self.train_csv, self.test_csv, self.per = video_root, train_csv, test_csv, per

    def _csv(self, path: str, name: str, columns: tuple[str, ...]):
        csv = os.path.join(os.path.dirname(path), name)
        if not os.path.exists(csv):
            raise FileNotFoundError(f"no such file: {csv} (MSR-VTT's split list, beside {path})")
        ds = load_dataset("csv", data_files=[csv], split="train", cache_dir=self.cache_dir,
                          converters={"video_id": str})
        for column in columns:
            if column not in ds.column_names:
                raise KeyError(f"{csv}: no column {column!r} (columns: {', '.join(ds.column_names)})")
        return ds

    def _load(self, path: str, split: str) -> tuple:
        if split not in self.splits:
            raise KeyError(f"{path}: no MSR-VTT list given for {split!r} (splits: {self.splits})")
        if self.splits[split] == "test":  # the list's own sentence, one per video
            ds = self._csv(path, self.test_csv, ("video_id", "sentence"))
            columns = ds[:]
            rows = [{"video_id": v, "keys": [v], "captions": [s]}
                    for v, s in zip(columns["video_id"], columns["sentence"])]
        else:  # every caption the json gives a listed video
            ids = self._csv(path, self.train_csv, ("video_id",))[:]["video_id"]
            sentences = load_dataset("json", data_files=path, field="sentences", split="train",
                                     cache_dir=self.cache_dir)
            for column in ("video_id", "caption", "sen_id"):
                if column not in sentences.column_names:
                    raise KeyError(f"{path}: sentences have no {column!r} field: not MSRVTT_data.json")
            by_video: dict[str, list] = {v: [] for v in ids}
            columns = sentences[:]  # whole columns at once: Column iteration goes row by row (seconds for 200K)
            for v, caption, sen_id in zip(columns["video_id"], columns["caption"], columns["sen_id"]):
                if v in by_video:
                    by_video[v].append((f"{v}-{sen_id}", caption))
            rows = [{"video_id": v, "keys": [k for k, _ in s], "captions": [c for _, c in s]}
                    for v, s in by_video.items()]
        features = Features({"video_id": Value("string"), "keys": [Value("string")], "captions": [Value("string")]})
        ds = Dataset.from_list(rows, features=features)
        return ds, list(range(len(ds)))

    def read(self, shard: Shard) -> Iterator[dict]:
        root = self.video_root or os.path.join(os.path.dirname(shard.file), "videos", "all")
        if not self.video_root and not os.path.isdir(root):
            root = os.path.dirname(shard.file)
        for row in self.rows(shard):
            video_id, path = row["video_id"], os.path.join(root, f"{row['video_id']}.mp4")
            captions = [c for c in row["captions"] if c]  # an empty CSV cell reads as None, a quoted one as ""
            if not captions:
                yield {"key": video_id, "bad": "missing_caption"}
            elif self.per == "video":
                yield {"key": video_id, "video_path": path, "text": captions}
            else:
                for key, caption in zip(row["keys"], row["captions"]):
                    if caption:
                        yield {"key": key, "video_path": path, "text": caption}
