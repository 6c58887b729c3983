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
