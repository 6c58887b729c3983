import numpy as np
import pytest
import torch

from vlm.data.collate import PretrainCollator
from vlm.data.decode import BadSample
from vlm.data.regions import RegionFile, Regions, write_regions
from vlm.data.sources import WebDataset
from vlm.data.stream import ShardStream
from vlm.data.tokenizer import load_tokenizer
from vlm.data.transforms import build_transform


def records(n=5, dim=6):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        k = i % 3 + 1
        xy = rng.uniform(0, 50, (k, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (k, 2)).astype(np.float32)], 1)
        out.append((f"img-{i}", Regions(boxes, rng.normal(size=(k, dim)).astype(np.float32), 100 + i, 80 + i)))
    return out


@pytest.mark.parametrize("suffix", [".tsv", ".h5", ".npz"])
def test_region_files_round_trip(tmp_path, suffix):
    path = tmp_path / f"regions{suffix}"
    items = records()
    assert write_regions(path, iter(items)) == len(items)
    f = RegionFile(path)
    assert sorted(f.keys()) == [k for k, _ in items]
    for key, r in items:
        got = f.get(key)
        np.testing.assert_array_equal(got.boxes, r.boxes)
        np.testing.assert_array_equal(got.features, r.features)
        assert (got.width, got.height) == (r.width, r.height)
    assert f.get("absent") is None


def test_tsv_is_the_bottom_up_layout(tmp_path):
    path = tmp_path / "r.tsv"
    write_regions(path, iter(records(1)))
    fields = path.read_bytes().rstrip(b"\n").split(b"\t")
    assert len(fields) == 6 and fields[0] == b"img-0" and fields[1:4] == [b"100", b"80", b"1"]
    import base64

    assert np.frombuffer(base64.b64decode(fields[4]), np.float32).shape == (4,)


def test_sample_fields_scale_boxes_to_the_transformed_frame(tmp_path):
    path = tmp_path / "r.h5"
    write_regions(path, iter([("a", Regions(np.array([[10, 20, 50, 40]], np.float32), np.ones((1, 3), np.float32), 100, 80))]))
    fields = RegionFile(path).sample_fields("a", height=160, width=50)
    assert fields["boxes"].tolist() == [[5.0, 40.0, 25.0, 80.0]]
    assert fields["box_features"].shape == (1, 3) and fields["box_labels"].tolist() == [-1] and fields["bad_boxes"] == 0
    with pytest.raises(BadSample, match="no_regions"):
        RegionFile(path).sample_fields("b", 10, 10)


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="suffix"):
        RegionFile(tmp_path / "r.lmdb")
    with pytest.raises(FileNotFoundError, match="extract_regions"):
        RegionFile(tmp_path / "r.npz")


def test_stream_joins_regions_by_key_and_counts_samples_without(synthetic, tmp_path):
    source = WebDataset()
    shards = source.shards(synthetic.shards("val")[:1], "val")
    keys = [ex["key"] for ex in source.read(shards[0])]
    kept = keys[1::2]  # the last sample kept: skips after a stream's last batch have no batch to be counted on
    items = [(k, Regions(np.array([[0, 0, 32, 32], [8, 8, 16, 24]], np.float32), np.full((2, 4), i, np.float32), 64, 64))
             for i, k in enumerate(kept)]
    path = tmp_path / "r.npz"
    write_regions(path, iter(items))
    tokenizer = load_tokenizer(synthetic.root + "/tokenizer")
    stream = ShardStream([(source, shards)], build_transform(64, 96), PretrainCollator(tokenizer), batch_size=8, shuffle=False,
                         regions=RegionFile(path))
    batches = list(stream)
    assert sum(b.skipped.get("no_regions", 0) for b in batches) == len(keys) - len(kept)
    assert sum(len(b) for b in batches) == len(kept)
    b = batches[0]
    assert b.keys[0] == kept[0] and b.box_features[0][:, 0].tolist() == [0.0, 0.0]
    h, w = int(b.pixel_mask[0, :, 0].sum()), int(b.pixel_mask[0, 0, :].sum())
    torch.testing.assert_close(b.boxes[0][0], torch.tensor([0, 0, 32 * w / 64, 32 * h / 64]))
