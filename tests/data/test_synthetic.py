import hashlib
import json
import tarfile

from vlm.data.synthetic import SyntheticData
from vlm.data.synthetic_scenes import HELD_OUT


def digest(paths):
    h = hashlib.sha256()
    for p in paths:
        h.update(open(p, "rb").read())
    return h.hexdigest()


def metas(paths):
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    yield json.loads(tar.extractfile(m).read())


def test_deterministic_byte_for_byte(tmp_path):
    a = SyntheticData(str(tmp_path / "a"), train_size=40, val_size=10, test_size=10, shard_size=20, workers=1)
    b = SyntheticData(str(tmp_path / "b"), train_size=40, val_size=10, test_size=10, shard_size=20, workers=2)
    a.ensure(), b.ensure()
    for split in ("train", "val", "test_compositional"):
        assert digest(a.shards(split)) == digest(b.shards(split))
    assert not a.ensure()  # complete data is reused, not rewritten
    c = SyntheticData(str(tmp_path / "c"), seed=1, train_size=40, val_size=10, test_size=10, shard_size=20, workers=1)
    c.ensure()
    assert digest(a.shards("train")) != digest(c.shards("train"))


def test_compositional_split_holds_only_unseen_combinations(synthetic):
    def combos(split):
        return [{(o["color"], o["shape"]) for o in m["objects"]} for m in metas(synthetic.shards(split))]

    for split in ("train", "val"):
        assert all(not (c & HELD_OUT) for c in combos(split))
    test = combos("test_compositional")
    assert test and all(c & HELD_OUT for c in test)


def test_annotations_are_consistent(synthetic):
    n = 0
    for m in metas(synthetic.shards("train")):
        n += 1
        assert 1 <= len(m["objects"]) <= 4
        assert len(m["boxes"]) == len(m["labels"]) == len(m["objects"])
        for x1, y1, x2, y2 in m["boxes"]:
            assert 0 <= x1 < x2 <= m["width"] and 0 <= y1 < y2 <= m["height"]
        for o in m["objects"]:  # the caption names every object's colour and shape
            assert o["color"] in m["caption"] and o["shape"] in m["caption"]
        assert m["qa"][0]["question"] == "how many shapes are there?"
        assert isinstance(m["pair"]["label"], bool) and m["pair"]["partner"].startswith("train-")
    assert n == 256


def test_wide_scenes_span_web_aspect_ratios_and_sizes_and_the_default_is_unchanged():
    import hashlib
    import json
    from dataclasses import asdict

    from vlm.data.synthetic_scenes import layout

    sizes = [layout(0, "train", i, "wide")[:2] for i in range(400)]
    ratios = [max(w, h) / min(w, h) for w, h in sizes]
    assert min(max(w, h) for w, h in sizes) >= 96 and max(max(w, h) for w, h in sizes) <= 512
    assert max(ratios) > 2.7 and min(ratios) < 1.1 and min(min(w, h) for w, h in sizes) >= 64
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    default = [layout(0, "train", i)[:2] for i in range(400)]
    assert max(max(w, h) / min(w, h) for w, h in default) <= 1.76  # the default data is as it was
    data = SyntheticData("x")
    params = {k: v for k, v in asdict(data).items() if k not in ("root", "workers", "aspect", "probe")}
    assert data.fingerprint() == hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    assert SyntheticData("x", aspect="wide").fingerprint() != data.fingerprint()


def test_the_colour_probe_is_decided_by_the_dot_alone():
    """The image control (data=synthetic_control): the scene the foil describes is the same scene with the dot in the
    foil's colour, pixel for pixel the same elsewhere; the dot's pixels carry the caption's colour, and still do
    where the study reads them (JPEG, resized to its size), at a quarter of a patch wide at most; the foil differs
    from the caption in that one word."""
    import io
    from collections import Counter

    import numpy as np
    from omegaconf import OmegaConf
    from PIL import Image

    from tests.conftest import ROOT
    from vlm.data.synthetic_scenes import COLORS, probe_layout, probe_sample, render
    from vlm.data.transforms import build_transform, to_boxes

    control = OmegaConf.load(ROOT / "conf" / "data" / "synthetic_control.yaml")
    study = OmegaConf.load(ROOT / "conf" / "experiment" / "compare_embedders.yaml").data
    assert control.generate.probe == "small_colour"
    assert (control.image_size, control.max_size) == (study.image_size, study.max_size) == (96, 160)
    transform = build_transform(control.image_size, control.max_size, normalize=False)
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], float)
    said, foils = Counter(), Counter()
    for i in range(40):
        _, jpg, meta = probe_sample(0, "val", i)
        _, _, swapped = probe_sample(0, "val", i, swap=True)
        dot = meta["dot"]
        assert (swapped["caption"], swapped["foil"]) == (meta["foil"], meta["caption"])
        words, foil_words = meta["caption"].split(), meta["foil"].split()
        assert len(words) == len(foil_words)
        changed = [k for k, (a, b) in enumerate(zip(words, foil_words)) if a != b]
        assert len(changed) == 1 and meta["caption"].count("tiny") == 1  # one word, naming the one tiny thing
        k = changed[0]
        assert (words[k - 1], words[k], foil_words[k], words[k + 1].rstrip(".")) == (
            "tiny", dot["color"], dot["foil_color"], "dot")
        assert len(meta["objects"]) >= 2 and meta["boxes"][-1] == dot["box"]  # shapes, and the dot with its box

        w, h, objs, d = probe_layout(0, "val", i)
        a = np.asarray(render(0, "val", i, w, h, [*objs, d.obj]), dtype=int)
        w2, h2, objs2, d2 = probe_layout(0, "val", i, swap=True)
        b = np.asarray(render(0, "val", i, w2, h2, [*objs2, d2.obj]), dtype=int)
        x1, y1, x2, y2 = dot["box"]
        outside = np.ones(a.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert (a[outside] == b[outside]).all() and (a != b).any()  # the two scenes differ in the dot alone
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
        assert tuple(a[cy, cx]) == COLORS[dot["color"]] and tuple(b[cy, cx]) == COLORS[dot["foil_color"]]

        image, box = transform(Image.open(io.BytesIO(jpg)).convert("RGB"), to_boxes([dot["box"]], h, w))
        bx1, by1, bx2, by2 = box[0].tolist()
        assert max(bx2 - bx1, by2 - by1) <= 32 / 4  # a quarter of a 32-pixel patch or stride-32 cell at most
        seen = image[:, int((by1 + by2) / 2), int((bx1 + bx2) / 2)].float().numpy()
        assert names[int(np.argmin(((palette - seen) ** 2).sum(1)))] == dot["color"]  # as the study reads it
        said[dot["color"]] += 1
        foils[dot["foil_color"]] += 1
    assert set(said) == set(foils) == set(COLORS)  # every colour on either side


def test_the_colour_probe_is_written_as_the_scenes_are_and_the_default_data_is_unchanged(tmp_path):
    import hashlib
    from dataclasses import asdict

    from vlm.data.synthetic import caption_texts, write_shard

    path = str(tmp_path / "train-00000.tar")
    assert write_shard(path, 0, "train", 0, 6, 6, probe="small_colour") == 6
    written = list(metas([path]))
    assert all(m["foil"] != m["caption"] and m["dot"]["box"] in m["boxes"] for m in written)
    texts = list(caption_texts([path]))
    assert texts == [t for m in written for t in (m["caption"], m["foil"])]  # the tokenizer learns both
    data = SyntheticData("x")
    params = {k: v for k, v in asdict(data).items() if k not in ("root", "workers", "aspect", "probe")}
    assert data.fingerprint() == hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    assert SyntheticData("x", probe="small_colour").fingerprint() != data.fingerprint()
