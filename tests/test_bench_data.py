"""`python -m vlm.bench data`'s photo report: both loader paths measured on photos through the real loader, and the
GPU's consumption computed from ViLT-B/32's counted FLOPs. No timing is asserted."""

import pytest

from vlm.bench import data as bench


@pytest.mark.slow
def test_photo_report_measures_both_paths_and_the_gpus_consumption(monkeypatch, tmp_path, synthetic):
    monkeypatch.setattr("vlm.data.export.PHOTO_SIZES", ((96, 72), (256, 192)))  # small photos: the report's shape
    r = bench.photo_report(tmp_path, 8, f"{synthetic.root}/tokenizer", repeats=1)
    assert [row["photo"] for row in r["rows"]] == ["96x72", "256x192"]
    for row in r["rows"]:
        assert row["pil_per_core"] > 0 and row["fast_per_core"] > 0 and row["kb_per_jpeg"] > 0
        assert row["cores_per_h100"] == pytest.approx(r["vilt_b32"]["all_patches"]["h100_samples_per_s"]
                                                      / row["fast_per_core"])
    full, kept = r["vilt_b32"]["all_patches"], r["vilt_b32"]["pretraining"]
    assert (full["tokens"], kept["tokens"]) == (40 + 240 + 1, 40 + 200 + 1)  # text, patches, the image's CLS
    # forward + backward ~ 3 x 2 x (86 M transformer weights) x tokens, plus attention: 150-160 GFLOPs at 281 tokens
    assert 140e9 < full["flops"] < 170e9 and kept["flops"] < full["flops"]
    assert full["h100_samples_per_s"] == pytest.approx(0.4 * 989e12 / full["flops"])


def test_every_exported_format_is_a_fixture_its_config_reads(tmp_path):
    """The per-layout rows are the built-in data and every format `vlm.data.export` finds in conf/data/, each read by
    the source its config builds: the training scenes written, in the shards asked for."""
    from vlm.data.export import formats
    from vlm.data.sources import read_shard

    assert bench.data_formats() == ["synthetic", *formats()]
    assert {"webdataset", "parquet", "coco_karpathy", "imagefolder"} <= set(formats())
    fixtures = bench.data_fixtures(tmp_path, 8, shards=2)
    assert list(fixtures) == bench.data_formats()
    for name, (source, files, _) in fixtures.items():
        shards = source.shards(files, "train")
        examples = [ex for shard in shards for ex in read_shard(source, shard) if not ex.get("bad")]
        assert len(shards) >= 2, name
        assert len(examples) == (8 * 5 if name == "coco_karpathy" else 8), name  # Karpathy: five captions an image
