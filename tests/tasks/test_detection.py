import csv

import torch

from tests.conftest import SMALL_DATA, compose_config
from tests.models.test_base import SMALL_DETECTOR
from vlm.data.collate import Batch
from vlm.models.embedders.region import RegionEmbedder
from vlm.tasks.detection import detector_inputs
from vlm.train import train


def test_detector_inputs_undo_normalisation_and_padding_and_shift_labels():
    images = torch.zeros(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[0] = True
    mask[1, :32, :64] = True
    batch = Batch(keys=["a", "b"], images=images, pixel_mask=mask, input_ids=torch.zeros(2, 1, dtype=torch.long),
                  attention_mask=torch.ones(2, 1), boxes=[torch.tensor([[1.0, 2, 3, 4]]), torch.zeros(0, 4)],
                  box_labels=[torch.tensor([0]), torch.zeros(0, dtype=torch.long)])
    ims, targets = detector_inputs(batch)
    assert [tuple(i.shape) for i in ims] == [(3, 64, 96), (3, 32, 64)] and ims[0].max() == 0.5
    assert targets[0]["labels"].tolist() == [1] and targets[1]["boxes"].shape == (0, 4)


def test_detection_task_trains_reports_map_and_its_checkpoint_loads_into_the_region_embedder(data_dir, tmp_path):
    cfg = compose_config(
        ["experiment=detection", "logger=csv", f"paths.data_dir={data_dir}", *SMALL_DATA, "data.batch_size=4",
         "data.image_size=64", "data.max_size=96", "data.num_workers=0", "trainer.max_steps=3",
         "trainer.val_check_interval=3", "+trainer.limit_val_batches=2", "trainer.log_every_n_steps=1", "model.returned_layers=[3,4]",
         "model.fpn_channels=32", "model.representation_size=32", "model.anchor_sizes=[32,64,128]"],
        output_dir=str(tmp_path),
    )
    train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert any(r.get("val/map_50") for r in rows) and any(r.get("train/loss_objectness") for r in rows)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    emb = RegionEmbedder(hidden_size=16, box_source="detector", detector=lambda: SMALL_DETECTOR(weights=str(ckpt)))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    torch.testing.assert_close(emb.detector.rpn.head.conv[0][0].weight, state["detector.rpn.head.conv.0.0.weight"])


def test_region_embedder_keeps_loaded_detector_weights_inside_vilt(tmp_path):
    from vlm.models.vilt import ViLT

    src = SMALL_DETECTOR()
    path = tmp_path / "det.pth"
    torch.save(src.state_dict(), path)
    emb = RegionEmbedder(hidden_size=16, box_source="detector", detector=lambda: SMALL_DETECTOR(weights=str(path)))
    ViLT(emb, vocab_size=20, hidden_size=16, num_layers=1, num_heads=2)  # its initialisation leaves the embedder alone
    torch.testing.assert_close(emb.detector.roi_heads.box_head.fc6.weight, src.roi_heads.box_head.fc6.weight)


def test_detection_reads_no_text_so_trains_no_tokenizer(tmp_path):
    """Its collate makes images and boxes only: no tokenizer is trained, no pretraining setting is zeroed."""
    from vlm.data import export

    files = export.export("webdataset", tmp_path / "web", 16, 8, shards=1)
    cfg = compose_config(["experiment=detection", "data=webdataset", f"data.train_files={files['train'][0]}",
                          f"data.val_files={files['val'][0]}", "logger=none", "debug=fdr", "data.image_size=64",
                          "data.max_size=96", "model.returned_layers=[3,4]", "model.fpn_channels=32",
                          "model.representation_size=32", "model.anchor_sizes=[32,64,128]"], output_dir=str(tmp_path))
    train(cfg)
    assert not (tmp_path / "web" / "tokenizer").exists()
