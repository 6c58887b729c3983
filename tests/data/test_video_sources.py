"""WebVid's metadata CSVs and MSR-VTT's json + split lists, written small in tmp_path with real mp4 files: which
examples each layout yields per split, and that they become clips (or counted skips) in the stream."""

import csv
import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_config
from vlm.config import check
from vlm.data.decode import BadSample
from vlm.data.sources import MSRVTT, WebVid, read_bytes
from vlm.data.stream import ShardStream
from vlm.data.transforms import build_transform
from vlm.data.video import ClipSampler, decode_video, encode_video
from vlm.tasks.base import HANDLED


def write_video(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.random.default_rng(seed).integers(0, 256, (4, 32, 48, 3), dtype=np.uint8)
    path.write_bytes(encode_video(frames))
    return str(path)


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def read_all(source, files, split="train"):
    return [ex for shard in source.shards(files, split) for ex in source.read(shard)]


@pytest.fixture
def webvid(tmp_path):
    """Two videos in their page_dir, one in the flat folder (page_dir given but empty of it), one never
    downloaded, one row without a caption; ids that would lose their leading zeros as numbers."""
    root = tmp_path / "webvid"
    paths = {"0001": write_video(root / "000001_000050" / "0001.mp4", 1),
             "0002": write_video(root / "000001_000050" / "0002.mp4", 2),
             "0003": write_video(root / "0003.mp4", 3)}
    header = ["videoid", "contentUrl", "duration", "page_dir", "name"]
    rows = [["0001", "http://x/1.mp4", "PT00H00M10S", "000001_000050", "a dog runs on the beach"],
            ["0002", "http://x/2.mp4", "PT00H00M12S", "000001_000050", "waves, at sunset"],
            ["0003", "http://x/3.mp4", "PT00H00M08S", "000051_000100", "a red car"],
            ["0004", "http://x/4.mp4", "PT00H00M09S", "000051_000100", "never downloaded"],
            ["0005", "http://x/5.mp4", "PT00H00M07S", "000051_000100", ""]]
    return write_csv(root / "results_2M_train.csv", header, rows), paths, tmp_path / "hf-cache"


def test_webvid_rows_their_videos_and_the_bad_ones(webvid):
    file, paths, cache = webvid
    source = WebVid(rows_per_shard=2, cache_dir=str(cache))
    assert len(source.shards(file, "train")) == 3
    out = read_all(source, file)
    assert [ex["key"] for ex in out] == ["0001", "0002", "0003", "0004", "0005"]
    assert [ex.get("text") for ex in out[:3]] == ["a dog runs on the beach", "waves, at sunset", "a red car"]
    assert [ex["video_path"] for ex in out[:3]] == [paths["0001"], paths["0002"], paths["0003"]]  # 0003: flat
    # never downloaded: the first candidate path, left to the stream to count
    assert out[3]["video_path"].endswith("webvid/000051_000100/0004.mp4") and "bad" not in out[3]
    assert out[4] == {"key": "0005", "bad": "missing_caption"}


def test_webvid_video_root_columns_and_a_missing_column(webvid, tmp_path):
    _, paths, cache = webvid
    flat = write_csv(tmp_path / "flat.csv", ["id", "caption"], [["0003", "a red car"], ["0001", "a dog"]])
    source = WebVid(video_root=str(tmp_path / "webvid"), id_column="id", caption_column="caption", folder_column=None,
                    cache_dir=str(cache))
    out = read_all(source, flat)
    assert [(ex["key"], ex["video_path"]) for ex in out] == [("0003", paths["0003"]),
                                                            ("0001", str(tmp_path / "webvid" / "0001.mp4"))]
    with pytest.raises(KeyError, match=r"no column 'page_dir' \(columns: id, caption\)"):
        WebVid(id_column="id", caption_column="caption", cache_dir=str(cache)).shards(flat, "train")


def test_webvid_examples_become_clips_and_missing_files_missing_video(webvid):
    file, _, cache = webvid
    source = WebVid(cache_dir=str(cache))
    out = read_all(source, file)
    stream = ShardStream([(source, source.shards(file, "train"))], build_transform(32, 48, size_divisor=16),
                         collate=None, batch_size=2, clips=ClipSampler(frames=3))
    sample, _ = stream.prepare(out[0])
    assert sample.image.shape == (3, 3, 32, 48) and sample.image.dtype == torch.float32
    assert sample.text == "a dog runs on the beach"
    assert read_bytes(out[3]["video_path"]) is None
    with pytest.raises(BadSample) as e:
        decode_video(None, ClipSampler(), train=False)
    assert e.value.reason == "missing_video"
    for ex, reason in ((out[3], "missing_video"), (out[4], "missing_caption")):
        with pytest.raises(BadSample) as e:
            stream.prepare(ex)
        assert e.value.reason == reason


@pytest.fixture
def msrvtt(tmp_path):
    """video0-video2 in the 9k list (video2 without any sentence), video3-video4 in the test list (video4 with an
    empty sentence); the json holds two captions for every video but video2."""
    root = tmp_path / "msrvtt"
    for k in range(4):
        write_video(root / "videos" / "all" / f"video{k}.mp4", k)
    sentences, sen_id = [], 0
    for k in (0, 1, 3, 4):
        for j in range(2):
            sentences.append({"video_id": f"video{k}", "caption": f"json caption {j} of video{k}", "sen_id": sen_id})
            sen_id += 1
    data = {"info": {}, "videos": [{"video_id": f"video{k}", "category": 0, "split": "train"} for k in range(5)],
            "sentences": sentences}
    (root / "MSRVTT_data.json").write_text(json.dumps(data))
    write_csv(root / "MSRVTT_train.9k.csv", ["video_id"], [["video0"], ["video1"], ["video2"]])
    write_csv(root / "MSRVTT_JSFUSION_test.csv", ["", "key", "vid_key", "video_id", "sentence"],
              [[0, "ret0", "msr3", "video3", "a man is cooking"], [1, "ret1", "msr4", "video4", ""]])
    return str(root / "MSRVTT_data.json"), root, tmp_path / "hf-cache"


def test_msrvtt_train_list_per_caption_and_per_video(msrvtt):
    file, root, cache = msrvtt
    videos = root / "videos" / "all"
    per_caption = read_all(MSRVTT(rows_per_shard=2, cache_dir=str(cache)), file)
    assert [(ex["key"], ex.get("text")) for ex in per_caption] == [
        ("video0-0", "json caption 0 of video0"), ("video0-1", "json caption 1 of video0"),
        ("video1-2", "json caption 0 of video1"), ("video1-3", "json caption 1 of video1"), ("video2", None)]
    assert per_caption[0]["video_path"] == str(videos / "video0.mp4") and per_caption[-1]["bad"] == "missing_caption"
    per_video = read_all(MSRVTT(per="video", cache_dir=str(cache)), file)
    assert [(ex["key"], ex.get("text")) for ex in per_video] == [
        ("video0", ["json caption 0 of video0", "json caption 1 of video0"]),
        ("video1", ["json caption 0 of video1", "json caption 1 of video1"]), ("video2", None)]
    assert per_video[1]["video_path"] == str(videos / "video1.mp4") and per_video[2]["bad"] == "missing_caption"


@pytest.mark.parametrize("split", ["val", "test"])
def test_msrvtt_test_list_takes_its_own_sentence(msrvtt, split):
    file, root, cache = msrvtt
    for per, text in (("caption", "a man is cooking"), ("video", ["a man is cooking"])):
        out = read_all(MSRVTT(per=per, cache_dir=str(cache)), file, split)
        assert out[0] == {"key": "video3", "video_path": str(root / "videos" / "all" / "video3.mp4"), "text": text}
        assert out[1] == {"key": "video4", "bad": "missing_caption"}


def test_msrvtt_video_root_fallback_and_wrong_layouts(msrvtt, tmp_path):
    file, root, cache = msrvtt
    (root / "videos" / "all").rename(root / "elsewhere")
    out = read_all(MSRVTT(cache_dir=str(cache)), file, "test")
    assert out[0]["video_path"] == str(root / "video3.mp4")  # no videos/all: the json's folder
    out = read_all(MSRVTT(video_root=str(root / "elsewhere"), cache_dir=str(cache)), file, "test")
    assert out[0]["video_path"] == str(root / "elsewhere" / "video3.mp4")
    with pytest.raises(FileNotFoundError, match="MSRVTT_train.7k.csv"):
        MSRVTT(train_csv="MSRVTT_train.7k.csv", cache_dir=str(cache)).shards(file, "train")
    with pytest.raises(KeyError, match="no column 'sentence'"):
        MSRVTT(test_csv="MSRVTT_train.9k.csv", cache_dir=str(cache)).shards(file, "test")
    with pytest.raises(ValueError, match="train or test list"):
        MSRVTT(splits={"train": "val"})
    with pytest.raises(ValueError, match="per must be"):
        MSRVTT(per="image")


@pytest.mark.parametrize("name, cls", [("webvid", WebVid), ("msrvtt", MSRVTT)])
def test_configs_compose_and_build_their_source(name, cls):
    cfg = compose_config([f"data={name}", "data.train_files=/data/x", "data.val_files=/data/y", "model/embedder=tubelet"])
    check(cfg, handled=HANDLED)  # every key of the source node is an argument of its class
    source = instantiate(cfg.data.source)
    assert type(source) is cls
    if name == "msrvtt":
        assert source.splits == {"train": "train", "val": "test", "test": "test"} and source.per == "caption"
        cfg = compose_config(["data=msrvtt", "data.train_files=/d/MSRVTT_data.json"])
        assert cfg.data.val_files == cfg.data.test_files == "/d/MSRVTT_data.json"
        assert instantiate(compose_config(["data=msrvtt", "data.source.per=video"]).data.source).per == "video"
