"""The downstream tasks' layouts: VQAv2, NLVR2, and the built-in scenes' questions and pair statements.

Each yields the raw examples of `vlm.data.sources.base` (a question or a statement as ``text``; what the task scores
against in ``extra``) and marks what it can already tell is unusable with ``bad``, as every source does.
COCO/Flickr30K retrieval reads Karpathy's splits with `vlm.data.sources.CocoKarpathy` (``per="image"``).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from math import ceil

from datasets import load_dataset
from lightning.pytorch.utilities import rank_zero_only

from vlm.data.sources.base import Shard, Source, TableSource, existing_files
from vlm.data.sources.images import WebDataset
from vlm.data.synthetic_scenes import SHAPES, balanced_statement, layout, scene_jpeg


def _top_field(path: str, name: str):
    """A top-level field of a json file (VQA's ``data_subtype``), read with the whole file."""
    with open(path) as f:
        return json.load(f).get(name)


class VQAv2(TableSource):
    """VQAv2's questions json (``files``) + annotations json (10 answers per question) + the COCO image folders.

    The annotations of a questions file are the ``annotations`` file (or glob) with the same ``data_subtype``
    (default: any ``*annotations*.json`` beside it); a questions file none matches (test-dev, test) gives
    questions without answers, for predictions: `shards` says so on one line for a val or test split, and stops
    for a training split, naming the subtypes it found instead. Images are at ``image_root/`` + ``image_pattern``
    (default root: the json's folder). A question whose answers are missing where its file has annotations is
    marked ``missing_answers``.
    """

    skip_reasons = ("missing_answers",)

    def __init__(self, image_root: str | None = None, annotations: str | list[str] | None = None,
                 image_pattern: str = "{subtype}/COCO_{subtype}_{image_id:012d}.jpg", rows_per_shard: int = 1000,
                 cache_dir: str | None = None):
        super().__init__(rows_per_shard, cache_dir)
        self.image_root, self.annotations, self.image_pattern = image_root, annotations, image_pattern
        self._meta: dict[str, tuple] = {}

    def __getstate__(self):
        return {**super().__getstate__(), "_meta": {}}

    def _annotation_files(self, path: str) -> list[str]:
        if self.annotations is not None:
            return existing_files(self.annotations)
        return sorted(glob.glob(os.path.join(os.path.dirname(path), "*annotations*.json")))

    def _answers(self, path: str, subtype) -> tuple[dict | None, str | None]:
        """({question_id: annotation} of the questions file, None), or (None, why there are none)."""
        files = self._annotation_files(path)
        where = f"in {self.annotations}" if self.annotations is not None else f"beside {path}"
        found = []
        for ann_path in files:
            with open(ann_path) as f:
                ann = json.load(f)
            other = ann.get("data_subtype") if isinstance(ann, dict) else None
            if other == subtype and isinstance(ann.get("annotations"), list):
                return {a["question_id"]: a for a in ann["annotations"]}, None
            found.append(f"{other} without an 'annotations' list in {ann_path}" if other == subtype
                         else f"{other} in {ann_path}")
        if not found:
            return None, f"no annotations {where}"
        return None, f"no annotations with data_subtype={subtype} {where} (found {'; '.join(found)})"

    def load(self, path: str, split: str) -> tuple:
        ds = load_dataset("json", data_files=path, field="questions", split="train", cache_dir=self.cache_dir)
        for column in ("question", "question_id", "image_id"):
            if column not in ds.column_names:
                raise KeyError(f"{path}: questions have no {column!r} field: not a VQA questions file")
        subtype = _top_field(path, "data_subtype")
        answers, why = self._answers(path, subtype)
        self._meta[path] = (subtype, answers, why)
        return ds, list(range(len(ds)))

    def shards(self, files, split: str) -> list[Shard]:
        """The shards; a training file without answers stops here (a vocabulary of nothing could only be
        reported as too high a ``min_count`` later), and a val / test file without is said once, on one line:
        its questions are predicted, and nothing is scored for it."""
        out = super().shards(files, split)
        unscored = [why for f in existing_files(files) if (why := self._meta[f][2]) is not None]
        if unscored and split == "train":
            raise FileNotFoundError(f"{unscored[0]}: training needs its answers (data.source.annotations=FILE "
                                    "names the annotations json)")
        if unscored and rank_zero_only.rank == 0:
            print(f"{split}: {'; '.join(unscored)}: its questions are answered but not scored", flush=True)
        return out

    def read(self, shard: Shard) -> Iterator[dict]:
        root = self.image_root or os.path.dirname(shard.file)
        rows = list(self.rows(shard))
        subtype, annotations, _ = self._meta[shard.file]
        for q in rows:
            qid = q["question_id"]
            key = str(qid)
            extra = {"question_id": qid, "image_id": q["image_id"]}
            if annotations is not None:
                ann = annotations.get(qid)
                answers = [a.get("answer") for a in (ann or {}).get("answers") or [] if isinstance(a, dict)]
                if not answers or not all(isinstance(a, str) for a in answers):
                    yield {"key": key, "bad": "missing_answers"}
                    continue
                extra.update(answers=answers, answer_type=ann.get("answer_type"))
            path = os.path.join(root, self.image_pattern.format(subtype=subtype, image_id=q["image_id"]))
            yield {"key": key, "image_path": path, "text": q["question"], "extra": extra}


class JsonLines(Source):
    """A json-lines file cut into shards of ``rows_per_shard`` lines, each line parsed on its own: a malformed
    line costs that line (``bad_json``), never the file. Subclasses turn a record into a raw example."""

    skip_reasons = ("bad_json",)

    def __init__(self, rows_per_shard: int = 1000):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.rows_per_shard = rows_per_shard

    def shards(self, files, split: str) -> list[Shard]:
        out = []
        for f in existing_files(files):
            with open(f, "rb") as fh:
                n = sum(1 for line in fh if line.strip())
            out += [Shard(f, k) for k in range(ceil(n / self.rows_per_shard))]
        return out

    def describe(self, shard: Shard) -> str:
        lo = shard.part * self.rows_per_shard
        return f"{shard.file} (lines {lo + 1}-{lo + self.rows_per_shard})"

    def read(self, shard: Shard) -> Iterator[dict]:
        lo, hi = shard.part * self.rows_per_shard, (shard.part + 1) * self.rows_per_shard
        with open(shard.file, encoding="utf-8", errors="replace") as fh:
            lines = (line for line in fh if line.strip())
            for n, line in enumerate(lines):
                if n < lo:
                    continue
                if n >= hi:
                    return
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    yield {"key": f"{os.path.basename(shard.file)}:{n + 1}", "bad": "bad_json"}
                    continue
                yield self.example(record, shard, n)

    def example(self, record: dict, shard: Shard, line: int) -> dict:
        raise NotImplementedError


def nlvr2_label(value) -> bool | None:
    """NLVR2's "True" / "False" (or a json boolean) as a bool; None for anything else."""
    if isinstance(value, bool):
        return value
    return {"true": True, "false": False}.get(value.strip().lower()) if isinstance(value, str) else None


class NLVR2(JsonLines):
    """NLVR2's json lines (``identifier``, ``sentence``, ``label`` "True"/"False", and ``directory`` in train)
    and its image folders: the pair of ``train-10171-0-0`` is ``train-10171-0-img0.png`` and ``...-img1.png``.

    As NLVR2 ships them, ``image_root`` (default: the json's folder) holds a folder per split, named as the
    identifiers name it (``train/``, ``dev/``, ``test1/``), and a training line's images sit in its ``directory``
    subfolder (``train/<0-99>/``): a plain root such as ``DIR/images`` is completed with both. A root without
    the split's folder is the folder itself, and a line's images not in its ``directory`` are looked for beside
    it, so that flat layouts read too. ``{split}`` in the root places the split's name elsewhere
    (``DIR/{split}_images``). Explicit ``left_image`` / ``right_image`` paths on a line (relative to the root)
    win. A line with one image or a label other than True/False is marked."""

    skip_reasons = ("bad_json", "bad_label", "missing_pair_image")

    def __init__(self, image_root: str | None = None, rows_per_shard: int = 1000):
        super().__init__(rows_per_shard)
        self.image_root = image_root
        self._split_dirs: dict[tuple[str, str], str] = {}

    def _split_dir(self, root: str, split: str) -> str:
        """``root/split`` where that folder exists, else ``root`` itself (checked once per root and split)."""
        if (root, split) not in self._split_dirs:
            folder = os.path.join(root, split)
            self._split_dirs[(root, split)] = folder if split and os.path.isdir(folder) else root
        return self._split_dirs[(root, split)]

    def example(self, record: dict, shard: Shard, line: int) -> dict:
        ident = record.get("identifier")
        key = str(ident) if ident is not None else f"{os.path.basename(shard.file)}:{line + 1}"
        sentence, label = record.get("sentence"), nlvr2_label(record.get("label"))
        if label is None:
            return {"key": key, "bad": "bad_label"}
        split = key.split("-", 1)[0]
        root = self.image_root or os.path.dirname(shard.file)
        if "left_image" in record or "right_image" in record:
            folders = [root.replace("{split}", split)]
        else:
            folder = root.replace("{split}", split) if "{split}" in root else self._split_dir(root, split)
            directory = record.get("directory")
            folders = ([os.path.join(folder, str(directory))] if directory is not None else []) + [folder]
        prefix = key.rsplit("-", 1)[0]
        left = record.get("left_image", f"{prefix}-img0.png" if ident is not None else None)
        right = record.get("right_image", f"{prefix}-img1.png" if ident is not None else None)
        if not left or not right:
            return {"key": key, "bad": "missing_pair_image"}
        for folder in folders:  # the first folder holding either image is the pair's
            paths = [os.path.join(folder, left), os.path.join(folder, right)]
            there = [os.path.exists(path) for path in paths]
            if any(there):
                break
        if not all(there):
            return {"key": key, "bad": "missing_pair_image" if any(there) else "missing_image"}
        left, right = paths
        return {"key": key, "image_path": left, "image2_path": right, "text": sentence,
                "extra": {"label": label, "identifier": key}}


class SyntheticVQA(WebDataset):
    """The built-in scenes' questions (count, colour, shape, existence), one example per question, keyed
    ``<scene>-q<k>``. The scenes have one unambiguous answer each, given as ten agreeing annotators."""

    def read(self, shard: Shard) -> Iterator[dict]:
        for ex in super().read(shard):
            if ex.get("bad"):
                yield ex
                continue
            for k, qa in enumerate(ex["extra"].get("qa") or []):
                qid = f"{ex['key']}-q{k}"
                yield {"key": qid, "image": ex["image"], "text": qa["question"], "boxes": ex.get("boxes"),
                       "box_labels": ex.get("box_labels"),
                       "extra": {"question_id": qid, "answers": [qa["answer"]] * 10, "answer_type": qa["type"]}}


class SyntheticNLVR2(WebDataset):
    """The built-in scenes as statement pairs: each scene (left), a statement about it and a second scene
    (right, drawn again from the generator's ``seed``: the first one from the scene its ``pair`` names on for
    which the statement has a truth drawn beforehand), and whether the statement holds. `balanced_statement`
    draws truth and wording independently, so neither the majority class nor the text alone beats 0.5."""

    skip_reasons = (*WebDataset.skip_reasons, "missing_pair_image")

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed

    def read(self, shard: Shard) -> Iterator[dict]:
        for ex in super().read(shard):
            if ex.get("bad"):
                yield ex
                continue
            pair = ex["extra"].get("pair") or {}
            split, _, partner = str(pair.get("partner", "")).rpartition("-")
            own = str(ex["key"]).rpartition("-")[2]
            if not (partner.isdigit() and own.isdigit()):
                yield {"key": ex["key"], "bad": "missing_pair_image"}
                continue
            statement, label, partner = balanced_statement(self.seed, split, int(own), int(partner))
            right = layout(self.seed, split, partner)[2]
            yield {"key": ex["key"], "image": ex["image"], "image2": scene_jpeg(self.seed, split, partner),
                   "boxes": ex.get("boxes"), "box_labels": ex.get("box_labels"),
                   "boxes2": [list(o.box) for o in right], "box_labels2": [SHAPES.index(o.shape) for o in right],
                   "text": statement, "extra": {"label": label, "identifier": ex["key"]}}
