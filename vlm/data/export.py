"""Write the built-in scenes in the other layouts the data module reads, optionally with broken samples.

img2dataset webdataset shards, parquet, COCO Karpathy (json + image folders) and imagefolder
(``metadata.jsonl`` / ``.csv``): to try a ``data=`` config end to end, and for the tests and the data
benchmark. ``--failed`` and ``--corrupt`` give the share of failed downloads (img2dataset leaves only
``KEY.json`` with ``"status": "failed_to_download"``) and of broken image bytes (half truncated, half garbage).
``photos``: webdataset shards of the scenes as photo-sized JPEGs (``--size``), what decoding costs on real photos.
The formats are the ``conf/data/`` configs of files of your own whose source writes examples
(`vlm.data.sources.Source.write_examples`, calling the writers here): a new layout's config and class are enough.

    python -m vlm.data.export webdataset --out /tmp/web --train 2000 --val 200 --shards 2 --failed 0.03 --corrupt 0.1
    python -m vlm.data.export photos --size 1600x1200 --out /tmp/photos --train 256 --val 32
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from vlm.data.synthetic_scenes import COLORS, SPLITS, draw_shape, jpeg, layout, make_sample, scene_caption

PHOTO_SIZES = ((640, 480), (1600, 1200))  # (width, height): a web photo, a camera's


def formats(search_path: Sequence[str | Path] = ()) -> dict[str, type]:
    """Format name -> its source class: each ``conf/data/`` config (and those on ``search_path``, Hydra's) whose
    files are yours to give (it generates none) and whose source class writes examples, once per class."""
    return dict(_formats(tuple(map(str, search_path))))


@functools.cache
def _formats(search_path: tuple[str, ...]) -> tuple[tuple[str, type], ...]:
    from vlm.cli import options

    out: dict[str, type] = {}
    for o in options("data", search_path, target="source._target_"):
        writes = getattr(o.cls, "writes_examples", None)
        if writes is not None and writes() and o.node.get("generate") is None and o.cls not in out.values():
            out[o.name] = o.cls
    return tuple(out.items())


def scenes(split: str, n: int, seed: int = 0) -> Iterator[tuple[str, bytes, dict]]:
    """(key, JPEG bytes, metadata) of the first ``n`` built-in scenes of ``split``."""
    for i in range(n):
        yield make_sample(seed, split, i, (i + 1) % max(n, 2))


def damage(key: str, seed: int, failed: float, corrupt: float) -> str | None:
    """What happens to this sample: None, ``failed``, ``truncated`` or ``garbage``; a function of (seed, key)."""
    r = np.random.default_rng([seed, 7, *key.encode()]).random(2)
    if r[0] < failed:
        return "failed"
    if r[0] < failed + corrupt:
        return "truncated" if r[1] < 0.5 else "garbage"
    return None


def broken(jpg: bytes, how: str | None, key: str) -> bytes:
    if how == "truncated":
        return jpg[: len(jpg) // 2]
    if how == "garbage":
        return np.random.default_rng([1, *key.encode()]).integers(0, 256, len(jpg) // 4, dtype=np.uint8).tobytes()
    return jpg


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _chunks(n: int, parts: int) -> list[range]:
    edges = np.linspace(0, n, parts + 1).astype(int)
    return [range(edges[k], edges[k + 1]) for k in range(parts)]


def write_webdataset(out: str | Path, split: str, n: int, shards: int = 1, seed: int = 0, failed: float = 0.0,
                     corrupt: float = 0.0, sample=None) -> list[str]:
    """img2dataset's layout: ``KEY.jpg``, ``KEY.txt`` and ``KEY.json`` (url, key, status, caption, size; plus
    the scene's boxes), in ``<split>-00000.tar`` ...; a failed download leaves only ``KEY.json``. ``sample``: i ->
    (key, JPEG bytes, metadata) instead of the built-in scenes'."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if sample is None:
        samples = list(scenes(split, n, seed))
        sample = samples.__getitem__
    paths = []
    for k, idx in enumerate(_chunks(n, shards)):
        path = out / f"{split}-{k:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in idx:
                key, jpg, meta = sample(i)
                how = damage(key, seed, failed, corrupt)
                url = f"https://example.invalid/{key}.jpg"
                if how == "failed":
                    record = {"url": url, "key": key, "status": "failed_to_download", "error_message": "HTTP Error 404"}
                    _add(tar, f"{key}.json", json.dumps(record).encode())
                    continue
                record = {"url": url, "key": key, "status": "success", "error_message": None, "caption": meta["caption"],
                          "width": meta["width"], "height": meta["height"], "boxes": meta["boxes"], "labels": meta["labels"]}
                _add(tar, f"{key}.jpg", broken(jpg, how, key))
                _add(tar, f"{key}.txt", meta["caption"].encode())
                _add(tar, f"{key}.json", json.dumps(record).encode())
        paths.append(str(path))
    return paths


def photo(seed: int, split: str, index: int, width: int, height: int, partner: int) -> tuple[str, bytes, dict]:
    """Built-in scene ``index`` as a ``width`` x ``height`` photo: JPEG quality 90, its shapes scaled to the frame
    over a background of 1/f noise (natural images' spectrum: equal contrast per octave), fine grain over
    everything, so that the file (about 2.5 bits per pixel, as a camera's photo) costs what a photo costs to
    decode. Its metadata is the scene's, boxes scaled (the scene scaled whole to fit the frame, centred)."""
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageDraw

    key, _, meta = make_sample(seed, split, index, partner)
    g = torch.Generator().manual_seed(int(np.random.default_rng([seed, SPLITS[split], index, 5]).integers(2**62)))

    def noise(h: int, w: int, colour: float) -> torch.Tensor:  # [1, 3, h, w]: luminance, some colour
        return torch.randn(1, 1, h, w, generator=g) + colour * torch.randn(1, 3, h, w, generator=g)

    octaves = max(1, int(np.log2(min(width, height) / 4)))
    x = noise(max(1, height >> octaves), max(1, width >> octaves), 0.6)
    for k in range(octaves - 1, 0, -1):  # coarse to fine, each octave half the contrast of the one above
        size = (max(1, height >> k), max(1, width >> k))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False) * 2.0 + noise(*size, 0.3)
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std() * 48 + 118
    img = Image.fromarray(x[0].clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    scale = min(width / meta["width"], height / meta["height"])  # the scene scaled whole (shapes stay square), centred
    dx, dy = (width - meta["width"] * scale) / 2, (height - meta["height"] * scale) / 2
    boxes = [[round(x1 * scale + dx), round(y1 * scale + dy), round(x2 * scale + dx), round(y2 * scale + dy)]
             for x1, y1, x2, y2 in meta["boxes"]]
    draw = ImageDraw.Draw(img)
    for box, obj in zip(boxes, meta["objects"]):
        draw_shape(draw, obj["shape"], tuple(box), COLORS[obj["color"]])
    grain = torch.randn(height, width, 1, generator=g) * 6
    pixels = (torch.from_numpy(np.array(img)).float() + grain).clamp(0, 255).to(torch.uint8)
    return key, jpeg(Image.fromarray(pixels.numpy())), {**meta, "width": width, "height": height, "boxes": boxes}


def write_photos(out: str | Path, split: str, n: int, size: tuple[int, int] = PHOTO_SIZES[0], shards: int = 1,
                 seed: int = 0, failed: float = 0.0, corrupt: float = 0.0) -> list[str]:
    """`write_webdataset`'s layout, the scenes as ``size`` = (width, height) photos (`photo`), written a shard at
    a time."""
    return write_webdataset(out, split, n, shards, seed, failed, corrupt,
                            sample=lambda i: photo(seed, split, i, *size, (i + 1) % max(n, 2)))


def write_parquet(out: str | Path, split: str, n: int, shards: int = 1, rows_per_group: int = 64, seed: int = 0,
                  failed: float = 0.0, corrupt: float = 0.0) -> list[str]:
    """``<split>-00000.parquet`` ...: columns key, image (`datasets`' Image struct, as on the Hub), caption."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features, Image, Value

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    features = Features({"key": Value("string"), "image": Image(), "caption": Value("string")})
    samples = list(scenes(split, n, seed))
    paths = []
    for k, idx in enumerate(_chunks(n, shards)):
        rows = {"key": [], "image": [], "caption": []}
        for i in idx:
            key, jpg, meta = samples[i]
            how = damage(key, seed, failed, corrupt)
            rows["key"].append(key)
            rows["image"].append(None if how == "failed" else {"bytes": broken(jpg, how, key), "path": None})
            rows["caption"].append(meta["caption"])
        table = pa.table(rows, schema=features.arrow_schema)
        path = out / f"{split}-{k:05d}.parquet"
        pq.write_table(table, path, row_group_size=rows_per_group)
        paths.append(str(path))
    return paths


def write_images(folder: Path, samples, seed: int, failed: float, corrupt: float) -> dict[str, str]:
    """JPEG files named by key; a failed download has no file. Returns key -> file name."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for key, jpg, _ in samples:
        how = damage(key, seed, failed, corrupt)
        names[key] = f"{key}.jpg"
        if how != "failed":
            (folder / names[key]).write_bytes(broken(jpg, how, key))
    return names


def captions(seed: int, split: str, index: int, first: str, n: int) -> list[str]:
    """The scene's caption and n - 1 more drawn like it, as COCO has five per image."""
    objs = layout(seed, split, index)[2]
    rngs = (np.random.default_rng([seed, SPLITS[split], index, 3, j]) for j in range(1, n))
    return [first] + [scene_caption(objs, rng) for rng in rngs]


def write_coco_karpathy(out: str | Path, sizes: dict[str, int], captions_per_image: int = 5, seed: int = 0,
                        failed: float = 0.0, corrupt: float = 0.0) -> str:
    """``dataset_coco.json`` (Karpathy's fields) + ``train2014/`` and ``val2014/``; ``sizes`` maps Karpathy
    splits (train, restval, val, test) to image counts. Returns the json's path."""
    out = Path(out)
    images, sentid, imgid = [], 0, 0
    for ksplit, n in sizes.items():
        split = "train" if ksplit in ("train", "restval") else "val"
        folder = "train2014" if split == "train" else "val2014"
        offset = 0 if ksplit != "restval" else sizes.get("train", 0)  # restval: more train scenes
        offset += sizes.get("val", 0) if ksplit == "test" else 0  # test: val scenes after val's
        samples = [make_sample(seed, split, i, i + 1) for i in range(offset, offset + n)]
        names = write_images(out / folder, samples, seed, failed, corrupt)
        for (key, _, meta) in samples:
            index = int(key.rsplit("-", 1)[1])
            sents = []
            for text in captions(seed, split, index, meta["caption"], captions_per_image):
                sents.append({"tokens": text.rstrip(".").split(), "raw": text, "imgid": imgid, "sentid": sentid})
                sentid += 1
            images.append({"filepath": folder, "filename": names[key], "imgid": imgid, "split": ksplit,
                           "sentences": sents, "sentids": [s["sentid"] for s in sents], "cocoid": 100000 + imgid})
            imgid += 1
    path = out / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return str(path)


def write_imagefolder(out: str | Path, split: str, n: int, metadata: str = "jsonl", seed: int = 0,
                      failed: float = 0.0, corrupt: float = 0.0) -> str:
    """``<split>/images/KEY.jpg`` + ``<split>/metadata.jsonl`` (or ``.csv``) with file_name and text."""
    folder = Path(out) / split
    samples = list(scenes(split, n, seed))
    names = write_images(folder / "images", samples, seed, failed, corrupt)
    rows = [{"file_name": f"images/{names[key]}", "text": meta["caption"]} for key, _, meta in samples]
    if metadata == "jsonl":
        path = folder / "metadata.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif metadata == "csv":
        path = folder / "metadata.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file_name", "text"])
            w.writeheader()
            w.writerows(rows)
    else:
        raise ValueError(f"metadata must be 'jsonl' or 'csv', got {metadata!r}")
    return str(path)


def export(fmt: str, out: str | Path, train: int, val: int, shards: int = 1, seed: int = 0, failed: float = 0.0,
           corrupt: float = 0.0, size: tuple[int, int] = PHOTO_SIZES[0],
           search_path: Sequence[str | Path] = ()) -> dict[str, list[str] | str]:
    """One format of `formats` (or ``photos`` of ``size``), train and val splits; returns the files to give as
    data.train_files / data.val_files."""
    if fmt == "photos":
        kw = dict(seed=seed, failed=failed, corrupt=corrupt)
        return {"train": write_photos(out, "train", train, size, shards, **kw),
                "val": write_photos(out, "val", val, size, 1, **kw)}
    layouts = formats(search_path)
    if fmt not in layouts:
        raise ValueError(f"unknown format {fmt!r}: choose from {', '.join(layouts)}, photos")
    return layouts[fmt].write_examples(out, {"train": train, "val": val}, shards, seed, failed, corrupt).files


def photo_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1600x1200, got {text!r}") from None
    if min(w, h) < 16:
        raise argparse.ArgumentTypeError(f"{text}: both sides must be at least 16 pixels")
    return w, h


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m vlm.data.export", description=__doc__.split("\n\n")[0])
    p.add_argument("format", choices=(*formats(), "photos"))
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=photo_size, default=PHOTO_SIZES[0], help="photos: WIDTHxHEIGHT (default 640x480)")
    p.add_argument("--train", type=int, default=2000, help="training samples (images for coco_karpathy)")
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--shards", type=int, default=2, help="training shards (webdataset, parquet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--failed", type=float, default=0.0, help="share of failed downloads")
    p.add_argument("--corrupt", type=float, default=0.0, help="share of broken image bytes")
    a = p.parse_args()
    files = export(a.format, a.out, a.train, a.val, a.shards, a.seed, a.failed, a.corrupt, a.size)
    for split, f in files.items():
        print(f"{split}: {' '.join(f) if isinstance(f, list) else f}")
    if a.format in ("webdataset", "photos"):
        print(os.path.join(a.out, "train-{00000..%05d}.tar" % (a.shards - 1)))


if __name__ == "__main__":
    main()
