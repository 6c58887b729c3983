import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import compose_config
from vlm.data.synthetic_glyphs import (
    COLORS,
    GLYPHS,
    HELD_OUT,
    SyntheticGlyphs,
    _combos,
    glyph_mask,
    make_sample,
    write_shard,
)
from vlm.data.synthetic_scenes import NUMBERS

# Overrides that point data=glyphs at the module's small data set (with `paths.data_dir=<its parent>`).
SMALL_GLYPHS = [
    "data.generate.train_size=128",
    "data.generate.val_size=32",
    "data.generate.test_size=32",
    "data.generate.shard_size=32",
]
NAMES = "|".join(COLORS)
PHRASE = rf"(?:small |big )?({NAMES}) (?:letter |digit )?([A-Z0-9])\b"
RELATION = re.compile(rf"{PHRASE} (?:is |sits )?(to the left of|to the right of|above|below) (?:an? |the ){PHRASE}")


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory) -> SyntheticGlyphs:
    data = SyntheticGlyphs(str(tmp_path_factory.mktemp("data") / "glyphs"), train_size=128, val_size=32, test_size=32,
                           shard_size=32)
    data.ensure()
    return data


def samples(paths):
    """(meta, RGB pixels [H, W, 3]) of every sample in the shards."""
    for p in paths:
        with tarfile.open(p) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        for name in sorted(files):
            if name.endswith(".json"):
                jpg = files[name[: -len(".json")] + ".jpg"]
                yield json.loads(files[name]), np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.int32)


def overlap(coloured: np.ndarray, char: str, o: dict) -> float:
    """Intersection over union of the coloured pixels with ``char`` drawn as object ``o`` was, fitted to its box."""
    drawn = glyph_mask(char, o["font_size"], o["stroke"], o["angle"]).resize(coloured.shape[::-1])
    shape = np.asarray(drawn) > 128
    return (coloured & shape).sum() / (coloured | shape).sum()


def test_the_same_bytes_by_seed_whoever_writes_them(tmp_path):
    data = SyntheticGlyphs(str(tmp_path / "data"), train_size=16, val_size=8, test_size=8, shard_size=8, workers=1)
    data.ensure()
    for split, total in data.sizes().items():
        for k, path in enumerate(data.shards(split)):  # written again in this process, not a spawned worker
            again = tmp_path / f"{split}-{k}.tar"
            write_shard(str(again), 0, split, k * 8, min(k * 8 + 8, total))
            assert again.read_bytes() == Path(path).read_bytes()
    assert not data.ensure()  # complete data is reused, not rewritten
    assert all(make_sample(1, "train", i)[1] != make_sample(0, "train", i)[1] for i in range(4))


def test_captions_name_what_is_drawn_and_where(glyphs):
    """Each captioned glyph's pixels in its box carry the captioned colour in the captioned character's shape, and
    the relation the caption names holds between the two glyphs' boxes."""
    n, relations, tones, textures, sizes = 0, set(), set(), set(), set()
    for m, pixels in samples(glyphs.shards("train") + glyphs.shards("val")):
        n += 1
        caption, objects = m["caption"], m["objects"]
        assert pixels.shape == (m["height"], m["width"], 3) and 96 <= min(pixels.shape[:2]) <= max(pixels.shape[:2]) <= 192
        assert 1 <= len(objects) <= 3 and len(m["boxes"]) == len(m["labels"]) == len(objects)
        assert len({(o["color"], o["glyph"]) for o in objects}) == len(objects)  # a phrase names one glyph
        named = {(c, g) for c, g in re.findall(PHRASE, caption)}
        assert named == {(o["color"], o["glyph"]) for o in objects}, caption
        assert m["qa"][0] == {"question": "how many characters are there?", "answer": NUMBERS[len(objects)], "type": "count"}
        for o, box, label in zip(objects, m["boxes"], m["labels"]):
            x1, y1, x2, y2 = box
            assert 0 <= x1 < x2 <= m["width"] and 0 <= y1 < y2 <= m["height"] and GLYPHS[label] == o["glyph"]
            crop = pixels[y1:y2, x1:x2]
            ink = np.asarray(glyph_mask(o["glyph"], o["font_size"], o["stroke"], o["angle"])) > 200
            assert ink.shape == crop.shape[:2]
            core = np.median(crop[ink], axis=0)  # the middle of the strokes: the colour drawn
            nearest = min(COLORS, key=lambda c: np.abs(core - COLORS[c]).sum())
            assert nearest == o["color"] and np.abs(core - COLORS[o["color"]]).max() < 40, (caption, core)
            if n <= 48:  # every glyph drawn for each object is slow: the first scenes suffice
                coloured = np.abs(crop - np.array(COLORS[o["color"]])).sum(axis=2) < 120
                assert max(GLYPHS, key=lambda char: overlap(coloured, char, o)) == o["glyph"], caption
        rel = RELATION.search(caption)
        assert (rel is None) == (len(objects) == 1), caption
        if rel:
            (ca, ga, word, cb, gb), index = rel.groups(), {(o["color"], o["glyph"]): i for i, o in enumerate(objects)}
            (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = m["boxes"][index[ca, ga]], m["boxes"][index[cb, gb]]
            holds = {"to the left of": ax2 <= bx1, "to the right of": bx2 <= ax1, "above": ay2 <= by1, "below": by2 <= ay1}
            assert holds[word], (caption, m["boxes"])
            relations.add(word)
        tones.add(m["background"]["tone"]), textures.add(m["background"]["texture"]), sizes.add(pixels.shape[:2])
    assert n == 160 and len(relations) == 4 and tones == {"dark", "light"} and len(textures) == 4
    assert any(h > w for h, w in sizes) and any(w > h for h, w in sizes)


def test_compositional_split_holds_only_held_out_combinations(glyphs):
    def combos(split):
        return [{(o["color"], o["glyph"]) for o in m["objects"]} for m, _ in samples(glyphs.shards(split))]

    for split in ("train", "val"):
        assert all(not (c & HELD_OUT) for c in combos(split))
    test = combos("test_compositional")
    assert len(test) == 32 and all(c & HELD_OUT for c in test)
    train = set(_combos("train"))
    assert all(c - HELD_OUT <= train for c in test)  # a test scene's other glyphs are as in training
    # each held-out glyph and colour is seen in training, only never together
    assert all(any(g == glyph for _, g in train) and any(c == colour for c, _ in train) for colour, glyph in HELD_OUT)


def test_train_runs_a_step_on_the_glyphs(glyphs, tmp_path, capsys):
    """`python -m vlm.train data=glyphs debug=fdr`: the same recipe, only the data changed."""
    from vlm.train import train

    cfg = compose_config(["data=glyphs", "debug=fdr", "logger=none", f"paths.data_dir={Path(glyphs.root).parent}",
                          *SMALL_GLYPHS, "data.batch_size=16"], output_dir=str(tmp_path))
    assert cfg.data.generate.root == glyphs.root and cfg.data.image_size == 160
    train(cfg)
    out = capsys.readouterr().out
    assert "val/itm_acc" in out and "skipped 0 samples" in out
    assert not glyphs.ensure()  # the run read the module's data, not a new copy
