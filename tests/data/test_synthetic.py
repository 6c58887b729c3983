import hashlib
import json
import tarfile

from vlm.data.synthetic import HELD_OUT, SyntheticData


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

    from vlm.data.synthetic import layout

    sizes = [layout(0, "train", i, "wide")[:2] for i in range(400)]
    ratios = [max(w, h) / min(w, h) for w, h in sizes]
    assert min(max(w, h) for w, h in sizes) >= 96 and max(max(w, h) for w, h in sizes) <= 512
    assert max(ratios) > 2.7 and min(ratios) < 1.1 and min(min(w, h) for w, h in sizes) >= 64
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    default = [layout(0, "train", i)[:2] for i in range(400)]
    assert max(max(w, h) / min(w, h) for w, h in default) <= 1.76  # the default data is as it was
    data = SyntheticData("x")
    params = {k: v for k, v in asdict(data).items() if k not in ("root", "workers", "aspect")}
    assert data.fingerprint() == hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    assert SyntheticData("x", aspect="wide").fingerprint() != data.fingerprint()
