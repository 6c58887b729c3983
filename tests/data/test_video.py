"""Video data: the clip sampler's frames, broken videos skipped and counted, clips and images batched together,
the built-in clips' foils."""

import io
import tarfile
from collections import Counter

import av
import numpy as np
import pytest
import torch

from vlm.data.collate import PretrainCollator, pad_images
from vlm.data.decode import BadSample
from vlm.data.sample import Sample
from vlm.data.sources import WebDataset
from vlm.data.stream import ShardStream, StreamLoader
from vlm.data.synthetic_video import clip
from vlm.data.tokenizer import load_tokenizer
from vlm.data.transforms import build_transform
from vlm.data.video import ClipSampler, decode_video, encode_video


@pytest.fixture(scope="module")
def tokenizer(synthetic):
    return load_tokenizer(f"{synthetic.root}/tokenizer")


def frames(n, h=32, w=48, seed=0):
    """``n`` frames whose red channel says their index (8 * k), the rest noise."""
    f = np.random.default_rng(seed).integers(0, 60, size=(n, h, w, 3), dtype=np.uint8)
    f[..., 0] = (8 * np.arange(n, dtype=np.uint8))[:, None, None]
    return f


def frame_ids(clip_frames):
    return [int(round(c[..., 0].astype(float).mean() / 8)) for c in clip_frames]


def test_segments_take_one_frame_per_segment_random_in_training_the_middle_at_evaluation():
    s = ClipSampler(frames=4)
    assert s.indices(16, train=False) == [1, 5, 9, 13]  # segments [0, 4), [4, 8), ...: their middles
    assert s.indices(10, train=False) == [1, 3, 6, 8]  # segments [0, 3), [3, 5), [5, 8), [8, 10)
    assert ClipSampler(frames=5).indices(17, train=False) == [1, 4, 8, 11, 15]  # [7, 10): the middle frame's
    rng = np.random.default_rng(0)
    seen = [s.indices(16, train=True, rng=rng) for _ in range(200)]
    for k in range(4):
        assert {idx[k] for idx in seen} == set(range(4 * k, 4 * k + 4))  # every frame of segment k, none outside
    assert s.indices(3, train=False) == [0, 1, 2]  # shorter than the clip: every frame, once
    assert s.indices(0, train=False) == []


def test_fps_sampling_takes_frames_at_the_rate_centred_at_evaluation():
    s = ClipSampler(frames=4, sampling="fps", fps=4.0)
    assert s.indices(20, train=False, video_fps=8.0) == [6, 8, 10, 12]  # every 2nd frame, span 7, centred in 20
    rng = np.random.default_rng(1)
    for _ in range(50):
        idx = s.indices(20, train=True, rng=rng, video_fps=8.0)
        assert len(idx) == 4 and np.all(np.diff(idx) == 2) and idx[-1] < 20
    with pytest.raises(ValueError, match="video.fps"):
        ClipSampler(frames=4, sampling="fps")


def test_decoding_keeps_the_sampled_frames_in_order():
    data = encode_video(frames(16))
    clip_frames = decode_video(data, ClipSampler(frames=4), train=False)
    assert clip_frames.shape == (4, 32, 48, 3)
    assert frame_ids(clip_frames) == [1, 5, 9, 13]
    webm = encode_video(frames(16), codec="libvpx", container_format="webm")  # no frame count in the container
    assert frame_ids(decode_video(webm, ClipSampler(frames=4), train=False)) == [1, 5, 9, 13]


def audio_only(with_video_stream: bool) -> bytes:
    """A file holding audio only, or audio and a video stream that has no frame."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska" if with_video_stream else "wav") as out:
        if with_video_stream:
            v = out.add_stream("libx264", rate=8)
            v.width, v.height, v.pix_fmt = 48, 32, "yuv420p"
        a = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*a.encode(frame), *a.encode()]:
            out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def broken_videos(tmp_path_factory):
    """Each kind of broken video, by the reason it is counted under."""
    path = str(tmp_path_factory.mktemp("videos") / "faststart.mp4")
    faststart = encode_video(frames(16), options={"movflags": "faststart"}, path=path)  # the index says 16 frames
    good = encode_video(frames(16))
    return {
        "empty_video": b"",
        "corrupt_video": b"\x00\x00\x00 not a video at all" * 20,
        "truncated_video": faststart[: len(faststart) // 2],
        "no_video_stream": audio_only(with_video_stream=False),
        "zero_frames": audio_only(with_video_stream=True),
        "cut_before_index": good[: len(good) // 2],  # an mp4 whose index was at the end: unreadable
    }


@pytest.mark.parametrize("kind", ["empty_video", "corrupt_video", "truncated_video", "no_video_stream", "zero_frames"])
def test_each_broken_video_is_named_by_its_reason(broken_videos, kind):
    with pytest.raises(BadSample) as e:
        decode_video(broken_videos[kind], ClipSampler(frames=4), train=False)
    assert e.value.reason == kind
    with pytest.raises(BadSample, match="missing_video"):
        decode_video(None, ClipSampler(), train=False)


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_a_shard_of_clips_images_and_broken_videos_streams_the_good_ones_and_counts_the_rest(
        tokenizer, tmp_path, broken_videos, synthetic):
    path = tmp_path / "clips-00000.tar"
    with tarfile.open(f"{synthetic.root}/val-00000.tar") as scenes:
        jpg = scenes.extractfile(scenes.getmembers()[0]).read()
    with tarfile.open(path, "w") as tar:
        add(tar, "a.mp4", encode_video(frames(16))), add(tar, "a.txt", b"a red square moves left.")
        add(tar, "b.webm", encode_video(frames(6), codec="libvpx", container_format="webm")), add(tar, "b.txt", b"b.")
        add(tar, "img.jpg", jpg), add(tar, "img.txt", b"a picture.")
        for kind, data in broken_videos.items():
            add(tar, f"{kind}.mp4", data), add(tar, f"{kind}.txt", b"a caption.")
    source = WebDataset()
    stream = ShardStream([(source, source.shards(str(path), "val"))], build_transform(32, 64, size_divisor=16),
                         PretrainCollator(tokenizer, 16), batch_size=16, shuffle=False, clips=ClipSampler(frames=4))
    batches = list(StreamLoader(stream, None, num_workers=0))
    assert len(batches) == 1
    batch = batches[0]
    assert batch.keys == ["a", "b", "img"]
    assert batch.images.shape == (3, 4, 3, 32, 48) and batch.pixel_mask.shape == (3, 4, 32, 48)
    assert batch.pixel_mask.flatten(2).any(-1).sum(1).tolist() == [4, 4, 1]  # the image: a clip of one frame
    assert Counter(batch.skipped) == Counter(empty_video=1, corrupt_video=2, truncated_video=1, no_video_stream=1,
                                             zero_frames=1)


def test_training_draws_new_frames_each_epoch_and_the_same_ones_again_for_the_same_epoch(tokenizer, tmp_path):
    path = tmp_path / "clips-00000.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "a.mp4", encode_video(frames(16))), add(tar, "a.txt", b"a caption.")
    source = WebDataset()
    ex = next(source.read(source.shards(str(path), "train")[0]))
    stream = ShardStream([(source, source.shards(str(path), "train"))], build_transform(32, 48), PretrainCollator(tokenizer, 16), 1, endless=True,
                         clips=ClipSampler(frames=4))

    def drawn(epoch):  # the frame indices the clip of ``epoch`` holds, read back from its red channel
        image = stream.prepare(ex, epoch)[0].image
        return [int(round(((f[0] * 0.5 + 0.5) * 255).mean().item() / 8)) for f in image]

    assert drawn(0) == drawn(0)
    assert len({tuple(drawn(e)) for e in range(6)}) > 1
    for e in range(6):
        assert [k // 4 for k in drawn(e)] == [0, 1, 2, 3]  # still one frame per segment


def test_clips_of_different_lengths_and_sizes_pad_with_masked_frames():
    images, mask = pad_images([torch.ones(5, 3, 8, 12), torch.ones(2, 3, 12, 8), torch.ones(3, 8, 8)])
    assert images.shape == (3, 5, 3, 12, 12) and mask.shape == (3, 5, 12, 12)
    assert mask.flatten(2).any(-1).tolist() == [[True] * 5, [True, True, False, False, False],
                                                 [True, False, False, False, False]]
    assert mask[1, 0].sum() == 12 * 8 and not mask[1, 0, :, 8:].any()
    assert (images[~mask[:, :, None].expand_as(images)] == 0).all()
    only_images = pad_images([torch.ones(3, 8, 12), torch.ones(3, 12, 8)])
    assert only_images[0].shape == (2, 3, 12, 12) and only_images[1].shape == (2, 12, 12)  # images stay images


def test_foils_replace_negatives_texts_and_keep_the_own_image(tokenizer):
    samples = [Sample(str(i), torch.zeros(3, 8, 8), text=f"a red square moves left {i}.",
                      extra={"foil": f"a red square moves right {i}."}) for i in range(8)]
    rng = np.random.default_rng(0)
    batch = PretrainCollator(tokenizer, 24, mlm_prob=0.0, itm_foil_fraction=1.0)(samples, rng)
    negatives = (batch.itm_labels == 0).nonzero().flatten().tolist()
    assert len(negatives) == 4
    assert batch.itm_index.tolist() == list(range(8))  # every negative is a foil: every image its own
    texts = tokenizer.batch_decode(batch.itm_ids, skip_special_tokens=True)
    for i in range(8):
        assert ("right" if i in negatives else "left") in texts[i].replace(" ", "")
    half = PretrainCollator(tokenizer, 24, mlm_prob=0.0, itm_foil_fraction=0.0)(samples, np.random.default_rng(0))
    assert half.itm_ids is None and (half.itm_index[half.itm_labels == 0] != torch.nonzero(half.itm_labels == 0).flatten()).all()


def test_a_built_in_clip_says_what_its_frames_show_and_its_foil_the_other_way():
    seen = Counter()
    for i in range(60):
        video, record = clip(0, "train", i)
        assert video.shape == (17, 96, 160, 3)
        said, event, backwards = record["caption"], record["event"], record["reversed"]
        # each event is drawn one way (right or down, appearing, first colour to second, towards); played
        # backwards, the caption says the other
        if event == "colour":
            drawn_way = said.split(" from ")[1].startswith(record["objects"][0]["color"])
        else:
            drawn_way = {"move": "right" in said or "down" in said, "appear": "disappears" not in said,
                         "approach": "away" not in said}[event]
        assert drawn_way != backwards, record
        assert record["foil"] != said
        seen[event, backwards] += 1
    assert len(seen) == 8  # every event, played both ways


def test_appearing_shapes_are_absent_then_present():
    for i in range(200):
        video, record = clip(0, "val", i)
        if record["event"] == "appear":
            first, last = video[0].astype(int), video[-1].astype(int)
            assert np.abs(first - last).sum() > 0
            appears = "disappears" not in record["caption"]
            # more of the frame is shape-coloured where the shape is (the background is dark and muted)
            assert (last.max(-1) > 120).sum() > (first.max(-1) > 120).sum() if appears else \
                (last.max(-1) > 120).sum() < (first.max(-1) > 120).sum()
            return
    pytest.fail("no appear event in 200 clips")


def test_the_built_in_clips_are_the_same_bytes_whoever_writes_them(tmp_path):
    from vlm.data.synthetic_video import SyntheticVideo

    def digest(data):
        return [open(p, "rb").read() for split in ("train", "val", "test") for p in data.shards(split)]

    a = SyntheticVideo(str(tmp_path / "a"), train_size=12, val_size=4, test_size=4, shard_size=6, workers=1)
    b = SyntheticVideo(str(tmp_path / "b"), train_size=12, val_size=4, test_size=4, shard_size=6, workers=2)
    assert a.ensure() and b.ensure() and not a.ensure()
    assert digest(a) == digest(b)


def test_the_control_sees_the_same_frame_in_a_clip_and_in_its_reversal():
    """compare_video_embedders' single_frame: at evaluation, the middle of 5 sampled frames of a 17-frame clip is
    frame 8, the clip's middle, which playing the clip backwards leaves in place: caption and foil alike."""
    from omegaconf import OmegaConf

    from tests.conftest import ROOT

    exp = OmegaConf.load(ROOT / "conf" / "experiment" / "compare_video_embedders.yaml")
    data = OmegaConf.load(ROOT / "conf" / "data" / "synthetic_video.yaml")
    n, k = data.generate.frames, exp.data.video.frames
    picked = ClipSampler(frames=k).indices(n, train=False)
    assert picked[(len(picked) - 1) // 2] == (n - 1) // 2 and n % 2 == 1  # FramesEmbedder(keep="middle")'s frame


@pytest.fixture
def decoded(monkeypatch):
    """The (width, height) of every frame a decoder hands to the code that reads a video."""
    sizes = []
    real_open = av.open

    class Watched:
        def __init__(self, container):
            self.container = container

        def __getattr__(self, name):
            return getattr(self.container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.container.close()

        def decode(self, *args, **kwargs):
            for frame in self.container.decode(*args, **kwargs):
                sizes.append((frame.width, frame.height))
                yield frame

    def watched_open(file, mode="r", **kwargs):
        container = real_open(file, mode, **kwargs)
        return Watched(container) if mode == "r" else container

    monkeypatch.setattr(av, "open", watched_open)
    return sizes


def blank_video(w, h, n=1, container_format="matroska", noise=False) -> bytes:
    """``n`` frames of w x h, H.264 at its fastest: blank ones of any size cost a few hundred kilobytes."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_format) as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        frame = av.VideoFrame(w, h, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        rng = np.random.default_rng(0)
        for _ in range(n):
            if noise:
                frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def huge_frame():
    """One blank 8192 x 5120 frame: 42 M pixels, over the default video.max_frame_pixels, in ~120 KB."""
    return blank_video(8192, 5120)


def test_a_video_over_a_pixel_cap_is_skipped_before_a_frame_is_decoded(decoded, huge_frame):
    small = encode_video(frames(16))  # 48 x 32 = 1536 pixels a frame
    for sampler in [ClipSampler(frames=4, max_frame_pixels=48 * 32 - 1),
                    ClipSampler(frames=4, max_clip_pixels=4 * 48 * 32 - 1), ClipSampler()]:
        with pytest.raises(BadSample) as e:
            decode_video(huge_frame if sampler == ClipSampler() else small, sampler, train=False)
        assert e.value.reason == "huge_video"
    assert decoded == []  # found from the stream's header: the decoder was never asked for a frame
    clip_frames = decode_video(small, ClipSampler(frames=4, max_frame_pixels=48 * 32, max_clip_pixels=4 * 48 * 32),
                               train=False)
    assert clip_frames.shape == (4, 32, 48, 3) and decoded == [(48, 32)] * 14  # at the caps: decoded to frame 13
    with pytest.raises(ValueError, match="video.max_clip_pixels"):
        ClipSampler(max_clip_pixels=0)


def test_a_larger_frame_later_in_the_stream_is_refused_by_the_decoder(decoded):
    # a raw H.264 stream of 48 x 32 frames that goes on at 96 x 64: its header says 48 x 32
    data = blank_video(48, 32, 16, "h264", noise=True) + blank_video(96, 64, 4, "h264", noise=True)
    with av.open(io.BytesIO(data)) as c:
        assert (c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height) == (48, 32)
        assert set(decoded) == set() and {(f.width, f.height) for f in c.decode(video=0)} == {(48, 32), (96, 64)}
    decoded.clear()
    with pytest.raises(BadSample) as e:
        decode_video(data, ClipSampler(frames=4, max_frame_pixels=48 * 32), train=False)
    assert e.value.reason == "huge_video"
    assert decoded and set(decoded) == {(48, 32)}  # the 96 x 64 frames were never decoded


def test_a_shard_with_a_clip_of_huge_frames_streams_the_rest_and_counts_it(
        tokenizer, tmp_path, synthetic, decoded, huge_frame):
    path = tmp_path / "clips-00000.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "a.mp4", encode_video(frames(16))), add(tar, "a.txt", b"a red square moves left.")
        add(tar, "huge.mkv", huge_frame), add(tar, "huge.txt", b"a blank.")
        add(tar, "b.mp4", encode_video(frames(8))), add(tar, "b.txt", b"b.")
    source = WebDataset()
    stream = ShardStream([(source, source.shards(str(path), "val"))], build_transform(32, 64, size_divisor=16),
                         PretrainCollator(tokenizer, 16), batch_size=16, shuffle=False, clips=ClipSampler(frames=4))
    batches = list(StreamLoader(stream, None, num_workers=0))
    assert [b.keys for b in batches] == [["a", "b"]]
    assert Counter(batches[0].skipped) == Counter(huge_video=1)
    assert set(decoded) == {(48, 32)}  # nothing of the huge clip was decoded


def test_the_pixel_caps_are_data_video_keys_and_a_wrong_one_fails_at_start():
    from tests.conftest import compose_config
    from vlm.config import check
    from vlm.errors import ConfigError
    from vlm.tasks.base import HANDLED

    cfg = compose_config(["data.video.max_frame_pixels=1000", "data.video.max_clip_pixels=4000"])
    check(cfg, handled=HANDLED)
    sampler = ClipSampler(**cfg.data.video)  # as the data module builds it
    assert (sampler.max_frame_pixels, sampler.max_clip_pixels) == (1000, 4000)
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.video\.max_frame_pixel'"):
        check(compose_config(["+data.video.max_frame_pixel=1000"]), handled=HANDLED)
    with pytest.raises(ConfigError, match=r"'data\.video\.max_clip_pixels' = 0: expected an int >= 1"):
        check(compose_config(["data.video.max_clip_pixels=0"]), handled=HANDLED)


def rotated_video(clip_frames: np.ndarray, degrees: int, hflip: bool = False) -> bytes:
    """An mp4 of ``clip_frames`` whose display matrix turns them ``degrees`` counter-clockwise (-90: a phone held
    upright, whose camera stores its frames sideways), then mirrors them left-right if ``hflip``."""
    buf = io.BytesIO()
    h, w = clip_frames.shape[1:3]
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "12"}
        stream.set_display_rotation(degrees, hflip=hflip)
        for f in clip_frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize("degrees, hflip", [(-90, False), (90, False), (180, False), (0, True), (-90, True)])
def test_a_rotated_video_is_decoded_upright(degrees, hflip):
    stored = np.zeros((4, 32, 48, 3), np.uint8)
    stored[:, :8, :16] = 255  # a white bar in the stored frames' top-left corner
    data = rotated_video(stored, degrees, hflip)
    with av.open(io.BytesIO(data)) as c:
        rotation = next(c.decode(video=0)).rotation  # what the file says (a mirror alone reads as -180)
    assert rotation == {(-90, False): -90, (90, False): 90, (180, False): -180, (0, True): -180, (-90, True): -90}[
        degrees, hflip]
    shown = np.rot90(stored, k=degrees // 90, axes=(1, 2))  # as a player shows it: counter-clockwise
    if hflip:
        shown = shown[:, :, ::-1]
    got = decode_video(data, ClipSampler(frames=2), train=False)
    assert got.shape == (2, *shown.shape[1:])
    assert ((got[..., 0] > 128) == (shown[:2, ..., 0] > 128)).all()


# the words in which a clip's caption and its foil may differ: where, which way, and (colour changes) the order of
# the two colours
TURNED = {"right", "left", "up", "down", "appears", "disappears", "towards", "away", "from"}


def test_a_clips_foil_is_the_caption_of_its_frames_played_backwards_byte_for_byte(tmp_path):
    """The time control: the clip played the other way is the same frames in reversed order, pixel for pixel, and
    its caption is the foil (and its foil the caption); the two differ only in the words that say which way things
    go; the frame single_frame sees is the same either way; and what the shards hold is that clip and that foil."""
    import difflib
    import json
    import tarfile

    from vlm.data.synthetic_scenes import COLORS
    from vlm.data.synthetic_video import write_shard

    events = Counter()
    for i in range(24):
        video, record = clip(0, "val", i)
        back, turned = clip(0, "val", i, reverse=not record["reversed"])
        assert turned["reversed"] != record["reversed"] and turned["event"] == record["event"]
        assert back.tobytes() == video[::-1].tobytes()  # the same frames, reversed, identical bytes
        assert sorted(f.tobytes() for f in back) == sorted(f.tobytes() for f in video)
        assert (turned["caption"], turned["foil"]) == (record["foil"], record["caption"])
        said, foil = record["caption"].rstrip(".").split(), record["foil"].rstrip(".").split()
        allowed = TURNED | (set(COLORS) if record["event"] == "colour" else set())
        if len(said) == len(foil):  # word for word
            changed = [w for a, b in zip(said, foil) if a != b for w in (a, b)]
        else:  # "towards" for "away from"
            changed = [w for op, a0, a1, b0, b1 in difflib.SequenceMatcher(a=said, b=foil).get_opcodes()
                       if op != "equal" for w in said[a0:a1] + foil[b0:b1]]
        assert changed and set(changed) <= allowed, (said, foil)
        if record["event"] == "colour":  # the same two colours, the other way round
            assert sorted(said) == sorted(foil)
        assert video[8].tobytes() == back[8].tobytes()  # the middle of 17 frames: what single_frame sees
        events[record["event"]] += 1
    assert set(events) == {"move", "appear", "colour", "approach"}

    shard = str(tmp_path / "val-00000.tar")
    write_shard(shard, 0, "val", 0, 3, 17, 96, 160)  # as SyntheticVideo writes its shards
    with tarfile.open(shard) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar}
    for i in range(3):  # (H.264 is lossy, and libx264's threads may vary its bytes: the decoded frames are compared)
        video, record = clip(0, "val", i)
        stored_frames = decode_video(files[f"val-{i:07d}.mp4"], ClipSampler(frames=17), train=False).astype(int)
        error, error_backwards = np.abs(stored_frames - video).mean(), np.abs(stored_frames - video[::-1]).mean()
        assert error < 3 and error < error_backwards  # the clip as drawn, in its order
        stored = json.loads(files[f"val-{i:07d}.json"])
        assert stored["foil"] == clip(0, "val", i, reverse=not record["reversed"])[1]["caption"]
