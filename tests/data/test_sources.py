"""Every format, written by vlm.data.export from the same scenes, streams the same samples through the same
collate; format-specific layouts and their broken variants."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vlm.data import export
from vlm.data.collate import PretrainCollator
from vlm.data.sources import CocoKarpathy, ImageFolder, Parquet, WebDataset, existing_files, expand_files
from vlm.data.stream import ShardStream, StreamLoader
from vlm.data.tokenizer import load_tokenizer
from vlm.data.transforms import build_transform
from vlm.errors import DataWarning

N_TRAIN, N_VAL = 20, 6


@pytest.fixture(scope="module")
def tokenizer(synthetic):
    return load_tokenizer(f"{synthetic.root}/tokenizer")


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """format -> (source, files by split) for the same 20 scenes in every format `vlm.data.export` writes, each read
    by the source its conf/data config builds (COCO Karpathy a sample per image, as every other layout)."""
    from hydra.utils import instantiate

    from vlm.cli import compose_train

    root = tmp_path_factory.mktemp("formats")
    out = {}
    for f, cls in export.formats().items():
        written = cls.write_examples(root / f, {"train": N_TRAIN, "val": N_VAL}, shards=2)
        node = compose_train([f"data={f}"]).data.source
        out[f] = (instantiate(node, **written.source, **({"per": "image"} if f == "coco_karpathy" else {})),
                  written.files)
    return out


def test_each_format_the_tests_name_is_found():
    assert {"webdataset", "parquet", "coco_karpathy", "imagefolder"} <= set(export.formats())


def stream_all(tokenizer, source, shards, split="train"):
    s = ShardStream([(source, shards)], build_transform(64, 96), PretrainCollator(tokenizer, 24), 4, shuffle=False)
    return list(StreamLoader(s, None, num_workers=0))


@pytest.mark.parametrize("fmt", export.formats())
def test_each_format_streams_through_the_same_collate(fmt, formats, tokenizer):
    source, files = formats[fmt]
    shards = source.shards(files["train"], "train")
    batches = stream_all(tokenizer, source, shards)
    assert sum(len(b) for b in batches) == N_TRAIN and not any(b.skipped for b in batches)
    for b in batches:
        assert b.images.shape[:2] == (len(b), 3) and b.images.shape[2] % 32 == 0 and b.pixel_mask.any()
        assert b.input_ids.shape == b.mlm_labels.shape and b.itm_labels is not None
    # the same scenes whatever the layout: compare each sample's first caption token ids and image size
    reference = stream_all(tokenizer, *formats["webdataset"][0:1], formats["webdataset"][0].shards(formats["webdataset"][1]["train"], "train"))
    sizes = sorted(tuple(m.sum(0).amax().item() for m in (b.pixel_mask[i],)) for b in batches for i in range(len(b)))
    ref_sizes = sorted(tuple(m.sum(0).amax().item() for m in (b.pixel_mask[i],)) for b in reference for i in range(len(b)))
    assert sizes == ref_sizes
    if fmt != "coco_karpathy":  # coco draws one of five captions per image
        texts = sorted(tokenizer.decode(ids, skip_special_tokens=True) for b in batches for ids in b.input_ids)
        ref = sorted(tokenizer.decode(ids, skip_special_tokens=True) for b in reference for ids in b.input_ids)
        assert texts == ref


def test_validation_split_of_each_format(formats):
    for fmt, (source, files) in formats.items():
        n = sum(1 for shard in source.shards(files["val"], "val") for _ in source.read(shard))
        assert n == N_VAL, fmt


def test_expand_files_ranges_globs_and_missing(tmp_path):
    for k in range(3):
        (tmp_path / f"s-{k:05d}.tar").write_bytes(b"")
    assert expand_files(f"{tmp_path}/s-{{00000..00002}}.tar") == [str(tmp_path / f"s-{k:05d}.tar") for k in range(3)]
    assert expand_files([f"{tmp_path}/s-*.tar", f"{tmp_path}/s-00001.tar"]) == expand_files(f"{tmp_path}/s-{{00000..00002}}.tar")
    with pytest.raises(FileNotFoundError, match="s-00003.tar"):
        existing_files(f"{tmp_path}/s-{{00000..00003}}.tar")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        existing_files(f"{tmp_path}/nothing-*.tar")


def test_img2dataset_failed_downloads_and_captions_from_json(tmp_path):
    files = export.write_webdataset(tmp_path, "train", 60, 1, failed=0.2, corrupt=0.0)
    rows = list(WebDataset().read(WebDataset().shards(files, "train")[0]))
    bad = Counter(r.get("bad") for r in rows)
    assert len(rows) == 60 and 5 <= bad["failed_download"] <= 20
    ok = [r for r in rows if "bad" not in r]
    assert all(r["text"] and r["image"][:2] == b"\xff\xd8" and len(r["boxes"]) == len(r["box_labels"]) for r in ok)
    # without KEY.txt the caption comes from the json's caption_key
    rows_json = list(WebDataset(text_ext="none").read(WebDataset().shards(files, "train")[0]))
    assert [r.get("text") for r in rows_json] == [r.get("text") for r in rows]


def test_parquet_bytes_and_path_columns_and_row_groups(tmp_path, tokenizer):
    scenes = list(export.scenes("train", 10))
    (tmp_path / "img").mkdir()
    for key, jpg, _ in scenes:
        (tmp_path / "img" / f"{key}.jpg").write_bytes(jpg)
    table = pa.table({"id": [k for k, _, _ in scenes], "jpg": [j for _, j, _ in scenes],
                      "path": [f"img/{k}.jpg" for k, _, _ in scenes], "txt": [m["caption"] for _, _, m in scenes]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=3)
    for column in ("jpg", "path"):
        source = Parquet(image_column=column, caption_column="txt", key_column="id")
        shards = source.shards(str(tmp_path / "t.parquet"), "train")
        assert len(shards) == 4  # row groups of 3, 3, 3, 1
        batches = stream_all(tokenizer, source, shards)
        assert sorted(k for b in batches for k in b.keys) == [k for k, _, _ in scenes]
    with pytest.raises(KeyError, match="no column 'nope'"):  # a wrong key fails at start, naming the column
        Parquet(image_column="jpg", caption_column="nope").shards(str(tmp_path / "t.parquet"), "train")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    source = Parquet(image_column="jpg", caption_column="txt", key_column="id")
    shards = source.shards([str(tmp_path / "t.parquet"), str(tmp_path / "broken.parquet")], "train")
    with pytest.warns(DataWarning, match="unreadable shard .*broken.parquet"):
        batches = stream_all(tokenizer, source, shards)
    assert sum(len(b) for b in batches) == 10 and sum(b.skipped.get("unreadable_shard", 0) for b in batches) == 1


def test_coco_karpathy_splits_and_per_caption(tmp_path, tokenizer):
    path = export.write_coco_karpathy(tmp_path, {"train": 4, "restval": 2, "val": 3, "test": 2}, captions_per_image=5)
    cache = str(tmp_path / "cache")
    per_caption = CocoKarpathy(cache_dir=cache)
    train = [r for s in per_caption.shards(path, "train") for r in per_caption.read(s)]
    assert len(train) == 6 * 5 and len({r["key"] for r in train}) == 30  # train + restval, a sample per caption
    assert len({r["image_path"] for r in train}) == 6
    per_image = CocoKarpathy(per="image", rows_per_shard=2, cache_dir=cache)
    shards = per_image.shards(path, "test")
    assert len(shards) == 1 and shards[0].split == "test"
    rows = [r for s in per_image.shards(path, "val") for r in per_image.read(s)]
    assert len(rows) == 3 and all(len(r["text"]) == 5 for r in rows)
    with pytest.raises(KeyError, match="no Karpathy split"):
        per_image.shards(path, "extra")
    data = json.loads(open(path).read())
    batches = stream_all(tokenizer, per_caption, per_caption.shards(path, "val"))
    assert sum(len(b) for b in batches) == 15
    assert {i["split"] for i in data["images"]} == {"train", "restval", "val", "test"}


def test_imagefolder_csv_and_missing_images(tmp_path, tokenizer):
    meta = export.write_imagefolder(tmp_path, "train", 8, metadata="csv", failed=0.3)
    source = ImageFolder(rows_per_shard=3, cache_dir=str(tmp_path / "cache"))
    shards = source.shards(meta, "train")
    assert len(shards) == 3
    batches = stream_all(tokenizer, source, shards)
    missing = sum(b.skipped.get("missing_image", 0) for b in batches)
    assert missing > 0 and sum(len(b) for b in batches) + missing == 8
    assert all(k.startswith("images/train-") for b in batches for k in b.keys)
    with pytest.raises(KeyError, match="no column 'caption'"):
        ImageFolder(caption_column="caption", cache_dir=str(tmp_path / "cache")).shards(meta, "train")


def test_boxes_follow_the_resize(formats, tokenizer):
    source, files = formats["webdataset"]
    batches = stream_all(tokenizer, source, source.shards(files["train"], "train"))
    for b in batches:
        for i, boxes in enumerate(b.boxes):
            assert boxes.shape[1] == 4 and len(boxes) == len(b.box_labels[i]) > 0
            h, w = b.pixel_mask[i].any(1).sum(), b.pixel_mask[i].any(0).sum()
            assert (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()
            assert torch.all(boxes[:, 2:] > boxes[:, :2])


def test_imagefolder_boxes_and_keys_from_columns(tmp_path, tokenizer):
    (tmp_path / "img").mkdir()
    rows = []
    for key, jpg, meta in export.scenes("train", 5):
        (tmp_path / "img" / f"{key}.jpg").write_bytes(jpg)
        rows.append({"file_name": f"img/{key}.jpg", "caption": meta["caption"], "id": key, "boxes": meta["boxes"],
                     "labels": meta["labels"]})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = ImageFolder(caption_column="caption", key_column="id", boxes_column="boxes", labels_column="labels",
                         cache_dir=str(tmp_path / "cache"))
    batches = stream_all(tokenizer, source, source.shards(str(tmp_path / "metadata.jsonl"), "train"))
    assert [k for b in batches for k in b.keys] == [r["id"] for r in rows]
    assert [b.tolist() for b in batches for b in b.box_labels] == [r["labels"] for r in rows]
