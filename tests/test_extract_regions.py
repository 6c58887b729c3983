"""python -m vlm.extract_regions writes a feature file that box_source=precomputed trains from."""

import subprocess
import sys

from tests.conftest import ROOT, SMALL_DATA, compose_config
from tests.test_train import TINY
from vlm.data.regions import RegionFile
from vlm.train import train

# one shard of each split, a small detector: the path, not the numbers
DATA = ["data.train_files=${.generate.root}/train-00000.tar", "data.val_files=${.generate.root}/val-00000.tar"]
DETECTOR = ["model.embedder.detector.box_score_thresh=0.0", "model.embedder.detector.returned_layers=[3,4]",
            "model.embedder.detector.fpn_channels=32", "model.embedder.detector.representation_size=32",
            "model.embedder.detector.anchor_sizes=[32,64,128]"]


def test_extract_then_train_from_precomputed_regions(data_dir, tmp_path, capsys):
    out = tmp_path / "regions.h5"
    res = subprocess.run(
        [sys.executable, "-m", "vlm.extract_regions", "--out", str(out), "--batch-size", "16", f"paths.data_dir={data_dir}",
         *SMALL_DATA, *DATA, *DETECTOR, "data.image_size=64", "data.max_size=96", "model.embedder.max_tokens=5"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "wrote 128 images (detector boxes, 512-d features)" in res.stdout
    f = RegionFile(out)
    regions = f.get("val-0000003")
    assert 1 <= len(regions.boxes) <= 5 and regions.features.shape == (len(regions.boxes), 512)
    assert (regions.boxes[:, 2] <= regions.width + 1e-3).all() and (regions.boxes[:, 3] <= regions.height + 1e-3).all()
    cfg = compose_config([*TINY, *DATA, f"paths.data_dir={data_dir}", "model/embedder=region",
                          "model.embedder.box_source=precomputed", f"data.region_features={out}"], output_dir=str(tmp_path))
    train(cfg)
    printed = capsys.readouterr().out
    assert "val/itm_acc" in printed and "skipped 0 samples" in printed


def test_extract_regions_refuses_precomputed(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "vlm.extract_regions", "--out", str(tmp_path / "r.h5"), "model.embedder.box_source=precomputed"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode != 0 and "cannot write one" in res.stderr
