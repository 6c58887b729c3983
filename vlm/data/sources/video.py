"""The video layouts: WebVid-10M's metadata CSVs and MSR-VTT's retrieval split (webdataset tars of videos are
`vlm.data.sources.images.WebDataset`'s)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Literal

from datasets import Dataset, Features, Value, load_dataset

from vlm.data.sources.base import Shard, TableSource


class WebVid(TableSource):
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

    def load(self, path: str, split: str) -> tuple:
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


class MSRVTT(TableSource):
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

    def load(self, path: str, split: str) -> tuple:
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
