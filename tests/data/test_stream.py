"""ShardStream / StreamProgress / StreamLoader: coverage of an epoch across ranks x workers, exact shuffled
resume, mixing, and bad samples that never stop the stream."""

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from torchvision.transforms.v2.functional import get_size

from vlm.data import export
from vlm.data import stream as stream_module
from vlm.data.collate import PretrainCollator
from vlm.data.sources import WebDataset
from vlm.data.stream import ShardStream, StreamLoader, StreamProgress
from vlm.data.tokenizer import load_tokenizer
from vlm.data.transforms import build_transform
from vlm.errors import DataWarning


@pytest.fixture(scope="module")
def tokenizer(synthetic):
    return load_tokenizer(f"{synthetic.root}/tokenizer")


def web_shards(tmp_path, n, shards, **damage):
    files = export.write_webdataset(tmp_path, "train", n, shards, **damage)
    return WebDataset(), WebDataset().shards(files, "train")


def make_stream(tokenizer, parts, batch_size=4, **kw):
    return ShardStream(parts, build_transform(32, 64), PretrainCollator(tokenizer, 16), batch_size, **kw)


def one_pass(stream, workers, rank=0, world=1, monkeypatch=None):
    """Every batch a finite stream yields on this rank, through a StreamLoader with ``workers`` workers."""
    if monkeypatch is not None:
        monkeypatch.setattr(stream_module, "distributed", lambda: (rank, world))
    return list(StreamLoader(stream, None, num_workers=workers))


def keys(batches):
    return [k for b in batches for k in b.keys]


@pytest.mark.parametrize("n_shards", [8, 5])
def test_two_ranks_two_workers_cover_an_epoch_exactly_once(tokenizer, tmp_path, monkeypatch, n_shards):
    source, shards = web_shards(tmp_path, 61, n_shards)
    seen = []
    for rank in range(2):
        s = make_stream(tokenizer, [(source, shards)], seed=3, shuffle=True)
        if n_shards % 4:
            with pytest.warns(DataWarning, match=f"{n_shards} shards .* do not divide among 4 streams"):
                batches = one_pass(s, 2, rank, 2, monkeypatch)
        else:
            batches = one_pass(s, 2, rank, 2, monkeypatch)
        assert {b.position[0] for b in batches} == {2 * rank, 2 * rank + 1}  # this rank's two streams
        seen += keys(batches)
    assert len(seen) == 61 and sorted(seen) == [f"train-{i:07d}" for i in range(61)]


def test_plan_deals_whole_shards_and_splits_the_rest(tokenizer, tmp_path):
    source, shards = web_shards(tmp_path, 10, 10)
    s = make_stream(tokenizer, [(source, shards)], seed=0)
    plans = [s.order.plan(0, k, 4, epoch=2) for k in range(4)]
    whole = [sh for p in plans for sh, keep in p if keep is None]
    assert sorted(whole) == sorted(set(whole)) and len(whole) == 8  # 8 shards dealt, each to one stream
    shared = [[(sh, keep) for sh, keep in p if keep is not None] for p in plans]
    assert all(len(p) == 2 for p in shared)  # the other 2 are read by all 4 streams
    for r in range(2):
        assert sorted(p[r][1] for p in shared) == [0, 1, 2, 3]  # ... which keep disjoint quarters
    assert s.order.plan(0, 0, 4, epoch=2) != s.order.plan(0, 0, 4, epoch=3)  # a new shard order each epoch
    assert s.order.layout_warning(5) is None and "10 shards" in s.order.layout_warning(4)


def consumed(stream_factory, workers, stops, total):
    """Keys of ``total`` batches consumed by a training loop that is interrupted after each step in ``stops``
    and resumed from the saved progress (a fresh stream and loader each time, as after a restart)."""
    progress, out = StreamProgress(), []
    bounds = [0, *stops, total]
    for lo, hi in zip(bounds, bounds[1:]):
        state = progress.state_dict()
        progress = StreamProgress()
        progress.load_state_dict(state)
        it = iter(StreamLoader(stream_factory(), progress, num_workers=workers, prefetch_factor=2 if workers else None))
        for _ in range(hi - lo):
            batch = next(it)
            progress.consume(batch)
            out.append(tuple(batch.keys))
        del it  # prefetched batches are dropped, as a killed run drops them
    return out


def test_shuffled_resume_with_two_workers_sees_the_same_samples(tokenizer, tmp_path):
    source, shards = web_shards(tmp_path, 44, 4, failed=0.05, corrupt=0.1)  # bad samples shift batch edges

    def factory():
        return make_stream(tokenizer, [(source, shards)], seed=7, shuffle=True, endless=True)

    total = 30  # about 3 epochs of 11 batches
    uninterrupted = consumed(factory, 2, [], total)
    assert len(set(uninterrupted)) > 20  # epochs are reshuffled, not repeated
    for stops in ([5], [7, 18], [1, 2, 3, 11, 12]):
        assert consumed(factory, 2, stops, total) == uninterrupted, stops


def test_resume_with_another_worker_count_is_refused(tokenizer, tmp_path):
    source, shards = web_shards(tmp_path, 16, 2)
    progress = StreamProgress()
    it = iter(StreamLoader(make_stream(tokenizer, [(source, shards)], endless=True), progress, num_workers=2))
    progress.consume(next(it))
    del it
    with pytest.raises(ValueError, match="layout"):
        iter(StreamLoader(make_stream(tokenizer, [(source, shards)], endless=True), progress, num_workers=0))


def test_mixture_follows_weights_and_resumes_exactly(tokenizer, tmp_path):
    a = web_shards(tmp_path / "a", 40, 2)
    files = export.write_parquet(tmp_path / "b", "val", 40, 2)  # other scenes: keys start with val-
    from vlm.data.sources import Parquet

    b = (Parquet(key_column="key"), Parquet(key_column="key").shards(files, "val"))

    def factory():
        return make_stream(tokenizer, [a, b], seed=1, shuffle=True, endless=True, weights=[3.0, 1.0])

    batches = consumed(factory, 2, [], 60)
    share = Counter(k.split("-")[0] for ks in batches for k in ks)
    assert abs(share["train"] / (share["train"] + share["val"]) - 0.75) < 0.06, share
    assert consumed(factory, 2, [9, 33], 60) == batches


def test_finite_mixture_reads_each_part_once(tokenizer, tmp_path):
    a, b = web_shards(tmp_path / "a", 10, 2), web_shards(tmp_path / "b", 6, 1)
    got = keys(one_pass(make_stream(tokenizer, [a, b], shuffle=False), 0))
    assert Counter(got) == Counter([f"train-{i:07d}" for i in range(10)] + [f"train-{i:07d}" for i in range(6)])


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_every_bad_kind_is_skipped_and_counted(tokenizer, tmp_path):
    """One tar holding each kind of bad sample, next to a garbage shard and a truncated one."""
    good = export.scenes("train", 6)
    path = tmp_path / "bad-00000.tar"
    (key, jpg, meta) = next(good)
    with tarfile.open(path, "w") as tar:
        add(tar, "ok.jpg", jpg), add(tar, "ok.txt", b"a red circle.")
        add(tar, "failed.json", json.dumps({"status": "failed_to_download", "error_message": "404"}).encode())
        add(tar, "nojpg.json", json.dumps({"status": "success", "caption": "x"}).encode())
        add(tar, "trunc.jpg", jpg[: len(jpg) // 2]), add(tar, "trunc.txt", b"a caption.")
        add(tar, "garbage.jpg", b"not an image at all"), add(tar, "garbage.txt", b"a caption.")
        add(tar, "zero.jpg", b""), add(tar, "zero.txt", b"a caption.")
        add(tar, "nocap.jpg", jpg), add(tar, "nocap.json", json.dumps({"status": "success"}).encode())
        add(tar, "empty.jpg", jpg), add(tar, "empty.txt", b"   ")
        add(tar, "long.jpg", jpg), add(tar, "long.txt", b"word " * 1000)
        add(tar, "badjson.jpg", jpg), add(tar, "badjson.json", b"{not json")
        add(tar, "badbox.jpg", jpg), add(tar, "badbox.json", json.dumps({"caption": "c", "boxes": [[1, 2, 3]]}).encode())
        add(tar, "intcap.jpg", jpg), add(tar, "intcap.json", json.dumps({"caption": 42}).encode())
        add(tar, "badutf.jpg", jpg), add(tar, "badutf.txt", b"caf\xe9 \xff")  # decoded with replacement: kept
    garbage = tmp_path / "bad-00001.tar"
    garbage.write_bytes(b"\x00garbage" * 100)
    truncated = tmp_path / "bad-00002.tar"
    full = export.write_webdataset(tmp_path / "t", "train", 4)[0]
    truncated.write_bytes(open(full, "rb").read()[:3000])
    source = WebDataset()
    s = make_stream(tokenizer, [(source, source.shards(str(tmp_path / "bad-*.tar"), "train"))], batch_size=2,
                    max_caption_chars=1000)
    with pytest.warns(DataWarning, match="unreadable shard"):
        batches = one_pass(s, 0)
    assert sorted(keys(batches)) == ["badbox", "badutf", "ok"]  # a bad box costs the box, not the sample
    skipped = sum((Counter(b.skipped) for b in batches), Counter())
    assert skipped == Counter(failed_download=1, missing_image=1, corrupt_image=2, empty_image=1, missing_caption=1,
                              empty_caption=1, bad_caption=1, long_caption=1, bad_json=1, bad_boxes=1, unreadable_shard=2)


def test_trailing_skips_are_counted_on_the_last_batch(tokenizer, tmp_path):
    source, shards = web_shards(tmp_path, 12, 1, corrupt=0.4)
    batches = one_pass(make_stream(tokenizer, [(source, shards)], batch_size=2, shuffle=False), 0)
    assert sum(len(b) for b in batches) + sum(sum(b.skipped.values()) for b in batches) == 12


def test_max_bad_run_stops_a_long_run_of_bad_samples_with_a_message(tokenizer, tmp_path):
    """Opt-in (data.max_bad_run): 50 unusable samples in a row stop the stream even though good ones follow."""
    source = WebDataset()
    good = export.write_webdataset(tmp_path, "train", 8, 1)[0]
    s = make_stream(tokenizer, [(source, source.shards([dead_shard(tmp_path / "dead.tar", 80), good], "train"))],
                    endless=True, shuffle=False, max_bad_run=50)
    with pytest.raises(RuntimeError, match=r"50 samples in a row were unusable \({'failed_download': 50}\), the last "
                                           r"'dead-00049' in .*dead.tar \(data.max_bad_run=50\)"):
        next(iter(StreamLoader(s, StreamProgress(), num_workers=0)))


def test_unexpected_sample_errors_cost_one_sample(tokenizer, tmp_path):
    source, shards = web_shards(tmp_path, 6, 1)
    s = make_stream(tokenizer, [(source, shards)], batch_size=2, shuffle=False)
    transform = s.prepare.transform
    s.prepare.transform = lambda img, *a, **kw: ((_ for _ in ()).throw(RuntimeError("boom")) if get_size(img)[1] % 2
                                        else transform(img, *a, **kw))
    with pytest.warns(DataWarning, match="boom"):
        batches = one_pass(s, 0)
    n_err = sum(b.skipped.get("error", 0) for b in batches)
    assert n_err > 0 and sum(len(b) for b in batches) + n_err == 6


def test_caption_lists_draw_one_caption_per_epoch(tokenizer, tmp_path):
    source, shards = web_shards(tmp_path, 2, 1)
    s = make_stream(tokenizer, [(source, shards)])
    ex = {"key": "k", "image": next(export.scenes("train", 1))[1], "text": ["one.", "two.", "three.", "", None]}
    picks = [s.prepare(ex, epoch)[0].text for epoch in range(30)]
    assert set(picks) == {"one.", "two.", "three."}
    assert picks == [s.prepare(ex, epoch)[0].text for epoch in range(30)]  # a function of (seed, epoch, key)
    assert s.prepare(ex, 0)[0].captions == ["one.", "two.", "three."]


def test_order_depends_on_seed_only_through_the_generators(tokenizer, tmp_path):
    source, shards = web_shards(tmp_path, 24, 3)
    a = keys(one_pass(make_stream(tokenizer, [(source, shards)], seed=0), 0))
    b = keys(one_pass(make_stream(tokenizer, [(source, shards)], seed=0), 0))
    c = keys(one_pass(make_stream(tokenizer, [(source, shards)], seed=1), 0))
    assert a == b and a != c and sorted(a) == sorted(c)
    plain = keys(one_pass(make_stream(tokenizer, [(source, shards)], shuffle=False), 0))
    assert plain == [f"train-{i:07d}" for i in range(24)]
    assert np.mean([x != y for x, y in zip(a, plain)]) > 0.5


def test_main_process_loading_runs_on_one_thread_and_gives_the_threads_back(tokenizer, tmp_path, monkeypatch):
    import torch

    source, shards = web_shards(tmp_path, 12, 1)
    s = make_stream(tokenizer, [(source, shards)], shuffle=False)
    seen = []
    transform = s.prepare.transform
    s.prepare.transform = lambda *a: (seen.append(torch.get_num_threads()), transform(*a))[1]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for batch in StreamLoader(s, None, num_workers=0):
            assert torch.get_num_threads() == 2  # the step between batches has every thread
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}


def _gather_positions(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    progress = StreamProgress()
    progress.positions = {2 * rank: {"draws": rank, "cursors": [[0, rank, 1]]}, 2 * rank + 1: {"draws": 9, "cursors": [[1, 0, 0]]}}
    progress.batches = 5
    state = progress.state_dict()
    if rank == 0:
        out.put(state)
    dist.destroy_process_group()


@pytest.mark.slow
def test_checkpoint_state_holds_every_ranks_streams():
    """Rank 0 writes the checkpoint: the data state it saves must hold the other ranks' streams too."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_gather_positions, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    state = out.get(timeout=120)
    for p in procs:
        p.join(60)
    assert sorted(state["positions"]) == [0, 1, 2, 3] and state["positions"][2]["cursors"] == [[0, 1, 1]]


def dead_shard(path, n=2500):
    """A webdataset shard of nothing but failed downloads, as img2dataset writes for a dead host."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            add(tar, f"dead-{i:05d}.json", json.dumps({"url": f"https://dead.invalid/{i}.jpg", "key": f"dead-{i:05d}",
                                                        "status": "failed_to_download", "error_message": "404"}).encode())
    return str(path)


def test_a_dead_shard_inside_good_data_is_skipped_and_counted(tokenizer, tmp_path):
    good = export.write_webdataset(tmp_path, "train", 16, 1)[0]
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    source = WebDataset()
    files = [good, dead_shard(tmp_path / "dead.tar"), str(empty)]
    s = make_stream(tokenizer, [(source, source.shards(files, "train"))], endless=True, shuffle=True)
    it = iter(StreamLoader(s, StreamProgress(), num_workers=0))
    with pytest.warns(DataWarning, match="in a row were unusable"):
        batches = [next(it) for _ in range(30)]  # 120 samples: 7 epochs of the good shard, past the dead one each time
    skipped = sum((Counter(b.skipped) for b in batches), Counter())
    assert skipped["failed_download"] >= 2 * 2500 and skipped["unreadable_shard"] >= 2
    assert all(len(b) == 4 for b in batches)


def test_a_whole_pass_with_nothing_usable_stops_naming_the_files(tokenizer, tmp_path):
    from vlm.errors import DataError

    source = WebDataset()
    files = [dead_shard(tmp_path / "dead-0.tar", 30), dead_shard(tmp_path / "dead-1.tar", 30)]
    s = make_stream(tokenizer, [(source, source.shards(files, "train"))], endless=True)
    with pytest.raises(DataError, match=r"no usable sample in a whole pass .*dead-0.tar.*dead-1.tar.*failed_download=60"):
        next(iter(StreamLoader(s, StreamProgress(), num_workers=0)))
    finite = make_stream(tokenizer, [(source, source.shards(files, "train"))])
    with pytest.raises(DataError, match="no usable sample"):
        next(iter(StreamLoader(finite, None, num_workers=0)))


@pytest.mark.parametrize("text", [42, 3.5, ["a", 7][1:], {"caption": "x"}])
def test_a_caption_that_is_not_text_is_a_bad_caption(tokenizer, tmp_path, text):
    from vlm.data.decode import BadSample

    source, shards = web_shards(tmp_path, 2, 1)
    s = make_stream(tokenizer, [(source, shards)])
    ex = {"key": "k", "image": next(export.scenes("train", 1))[1], "text": text}
    with pytest.raises(BadSample) as e:
        s.prepare(ex)
    assert e.value.reason == "bad_caption"


def test_degenerate_boxes_are_dropped_and_counted(tokenizer, tmp_path):
    """Inverted, outside the image, NaN: each such box is dropped and counted; its sample stays."""
    (key, jpg, meta) = next(export.scenes("train", 1))
    bad = [[30, 30, 10, 10], [5000, 5000, 6000, 6000], [float("nan"), 1, 20, 20], [1, 1, float("inf"), 9]]
    path = tmp_path / "boxes-00000.tar"
    with tarfile.open(path, "w") as tar:
        for i, (boxes, labels) in enumerate([(meta["boxes"] + bad, meta["labels"] + [0, 1, 2, 3]), (bad[:1], [5]),
                                              ([[1, 2, 3]], [0])]):
            add(tar, f"s{i}.jpg", jpg)
            add(tar, f"s{i}.json", json.dumps({"caption": "a scene.", "boxes": boxes, "labels": labels}).encode())
    source = WebDataset()
    s = make_stream(tokenizer, [(source, source.shards(str(path), "train"))], batch_size=3, shuffle=False)
    (batch,) = one_pass(s, 0)
    assert batch.keys == ["s0", "s1", "s2"]
    assert batch.skipped == {"bad_boxes": 4 + 1 + 1}
    assert len(batch.boxes[0]) == len(meta["boxes"]) and batch.box_labels[0].tolist() == meta["labels"]
    assert batch.boxes[1].shape == (0, 4) and batch.boxes[2].shape == (0, 4) and batch.box_labels[1].shape == (0,)
    b = batch.boxes[0]
    assert torch.isfinite(b).all() and (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
