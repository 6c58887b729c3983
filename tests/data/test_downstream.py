"""The downstream layouts on tiny files written here (VQAv2's json pair, NLVR2's json lines, Karpathy's json),
the built-in scenes' questions and pairs, and their collates; bad records skipped and counted by reason."""

import io
import json
import re
from collections import Counter

import pytest
import torch
from PIL import Image

from vlm.data import export
from vlm.data.answers import AnswerVocab
from vlm.data.collate import NLVR2Collator, RetrievalCollator, VQACollator
from vlm.data.sources import NLVR2, CocoKarpathy, SyntheticNLVR2, SyntheticVQA, VQAv2, WebDataset, nlvr2_label
from vlm.data.stream import ShardStream, StreamLoader
from vlm.data.synthetic_scenes import balanced_statement, layout, scene_jpeg
from vlm.data.tokenizer import load_tokenizer
from vlm.data.transforms import build_transform


@pytest.fixture(scope="module")
def tokenizer(synthetic):
    return load_tokenizer(f"{synthetic.root}/tokenizer")


def stream(source, files, collate, split="train", batch=4):
    s = ShardStream([(source, source.shards(files, split))], build_transform(64, 96), collate, batch, shuffle=False)
    batches = list(StreamLoader(s, None, num_workers=0))
    return batches, sum((Counter(b.skipped) for b in batches), Counter())


def png(path, color=(200, 30, 30), size=(48, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_vqa(root):
    """A train2014 questions file and its annotations: q1 (10 answers), q2 (answers missing), q3 (image missing)."""
    png(root / "train2014" / "COCO_train2014_000000000001.jpg")
    questions = {"data_subtype": "train2014", "questions": [
        {"image_id": 1, "question": "what color is it?", "question_id": 10},
        {"image_id": 1, "question": "is it red?", "question_id": 11},
        {"image_id": 2, "question": "how many?", "question_id": 12}]}
    answers = ["red"] * 3 + ["Red."] + ["dark red"] * 2 + ["maroon"] * 4
    annotations = {"data_subtype": "train2014", "annotations": [
        {"question_id": 10, "image_id": 1, "answer_type": "other", "answers": [{"answer": a} for a in answers]},
        {"question_id": 12, "image_id": 2, "answer_type": "number", "answers": [{"answer": "2"}] * 10}]}
    (root / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps(questions))
    (root / "v2_mscoco_train2014_annotations.json").write_text(json.dumps(annotations))
    return str(root / "v2_OpenEnded_mscoco_train2014_questions.json")


def test_vqav2_questions_answers_and_images(tmp_path, tokenizer):
    files = write_vqa(tmp_path)
    source = VQAv2(cache_dir=str(tmp_path / "cache"))
    raw = [ex for shard in source.shards(files, "train") for ex in source.read(shard)]
    assert [ex.get("bad") for ex in raw] == [None, "missing_answers", None]
    assert raw[0]["text"] == "what color is it?" and len(raw[0]["extra"]["answers"]) == 10
    assert raw[0]["image_path"].endswith("train2014/COCO_train2014_000000000001.jpg")
    vocab = AnswerVocab.build([raw[0]["extra"]["answers"]], min_count=2)
    assert vocab.answers == ["maroon", "red", "dark red"]  # "Red." normalises to "red": 4 of 10, tied with maroon
    batches, skipped = stream(source, files, VQACollator(tokenizer, vocab, 24))
    assert skipped == {"missing_answers": 1, "missing_image": 1}
    (b,) = batches
    assert b.question_ids == [10] and b.answer_types == ["other"]
    assert b.targets[0].tolist() == pytest.approx([1.0, 1.0, 0.6])  # 4 annotators -> 1.0, 4 -> 1.0, 2 -> 0.6
    assert b.answers_outside == 0


def test_vqav2_without_annotations_gives_questions_only(tmp_path):
    files = write_vqa(tmp_path)
    source = VQAv2(annotations=str(tmp_path / "none-*.json"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError):  # a pattern that names nothing is a config error
        source.shards(files, "test")
    (tmp_path / "other_annotations.json").write_text(json.dumps({"data_subtype": "val2014", "annotations": []}))
    source = VQAv2(annotations=str(tmp_path / "other_annotations.json"), cache_dir=str(tmp_path / "cache"))
    raw = [ex for shard in source.shards(files, "test") for ex in source.read(shard)]
    assert len(raw) == 3 and all("answers" not in ex["extra"] for ex in raw)  # test-dev: predictions only


def write_vqa_questions(path, subtype):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data_subtype": subtype, "questions": [
        {"image_id": 1, "question": "what is it?", "question_id": 20}]}))
    return str(path)


def test_vqav2_splits_without_annotations_are_named_once_at_the_start(tmp_path, capsys):
    """Val questions with no annotations of their own are answered, not scored: said on one line when the files
    are checked (the run's start), whether nothing lies beside them or only another subtype's annotations."""
    from vlm.data.datamodule import ImageTextDataModule

    train = write_vqa(tmp_path)
    val = write_vqa_questions(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", "val2014")  # beside train's
    test = write_vqa_questions(tmp_path / "test" / "v2_OpenEnded_mscoco_test-dev2015_questions.json", "test-dev2015")
    dm = ImageTextDataModule(train_files=train, val_files=val, test_files=test,
                             source=VQAv2(cache_dir=str(tmp_path / "cache")))
    capsys.readouterr()
    dm.check_files()
    dm.check_files()
    lines = capsys.readouterr().out.splitlines()
    annotations = tmp_path / "v2_mscoco_train2014_annotations.json"
    assert lines == [
        (f"val: no annotations with data_subtype=val2014 beside {val} (found train2014 in {annotations}): "
         "its questions are answered but not scored"),
        f"test: no annotations beside {test}: its questions are answered but not scored"]


def test_vqav2_training_questions_without_their_subtypes_annotations_name_the_cause(tmp_path):
    """Training questions whose only annotations beside them are another subtype's stop at the start, naming
    what was found, not later as an answer vocabulary too small for ``answer_min_count``."""
    from vlm.data.datamodule import ImageTextDataModule

    train = write_vqa_questions(tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json", "train2014")
    other = tmp_path / "v2_mscoco_val2014_annotations.json"
    other.write_text(json.dumps({"data_subtype": "val2014", "annotations": []}))
    dm = ImageTextDataModule(train_files=train, source=VQAv2(cache_dir=str(tmp_path / "cache")))
    with pytest.raises(FileNotFoundError) as e:
        dm.check_files()
    assert str(e.value).startswith(f"train_files: no annotations with data_subtype=train2014 beside {train} "
                                   f"(found val2014 in {other}): training needs its answers")
    other.unlink()
    dm = ImageTextDataModule(train_files=train, source=VQAv2(cache_dir=str(tmp_path / "cache")))
    with pytest.raises(FileNotFoundError, match=f"train_files: no annotations beside {re.escape(train)}: "):
        dm.check_files()


def test_vqa_answers_outside_the_vocabulary_are_counted_not_targets(tokenizer):
    from vlm.data.sample import Sample

    vocab = AnswerVocab(["yes", "no"])
    s = Sample("q", torch.zeros(3, 32, 32), "is it?", extra={"answers": ["yes"] * 2 + ["maybe"] * 8})
    b = VQACollator(tokenizer, vocab)([s], None)
    assert b.targets[0].tolist() == pytest.approx([0.6, 0.0]) and b.answers_outside == 8


def write_nlvr2(root):
    for name in ("dev-1-0-img0.png", "dev-1-0-img1.png", "dev-2-0-img0.png"):
        png(root / "dev" / name)
    png(root / "train" / "7" / "train-5-1-img0.png", (0, 0, 200))
    png(root / "train" / "7" / "train-5-1-img1.png", (0, 200, 0))
    lines = [
        json.dumps({"identifier": "dev-1-0-0", "sentence": "both are red.", "label": "True"}),
        "{not json",
        json.dumps({"identifier": "dev-1-0-1", "sentence": "one is blue.", "label": "maybe"}),
        json.dumps({"identifier": "dev-2-0-0", "sentence": "a pair with one image.", "label": "False"}),
        json.dumps({"identifier": "dev-3-0-0", "sentence": "no images at all.", "label": "False"}),
        json.dumps({"identifier": "train-5-1-0", "directory": 7, "sentence": "left blue.", "label": "False"}),
    ]
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "pairs.jsonl")


@pytest.mark.parametrize("root", ["{split}", "", None], ids=["split_template", "plain_root", "default_root"])
def test_nlvr2_lines_pairs_and_bad_lines(root, tmp_path, tokenizer):
    """The root's split folder (dev/, train/) and a train line's directory come from the identifier and the
    line, given a plain root, none (the json's folder) or a root with {split} in it."""
    files = write_nlvr2(tmp_path)
    source = NLVR2(image_root=None if root is None else str(tmp_path / root), rows_per_shard=4)
    assert len(source.shards(files, "val")) == 2
    batches, skipped = stream(source, files, NLVR2Collator(tokenizer, 24), split="val")
    assert skipped == {"bad_json": 1, "bad_label": 1, "missing_pair_image": 1, "missing_image": 1}
    assert [k for b in batches for k in b.keys] == ["dev-1-0-0", "train-5-1-0"]
    assert torch.cat([b.targets for b in batches]).tolist() == [1, 0]
    b = batches[-1]
    # the train line's images come from its directory: left blue, right green (normalised, so compare signs)
    left, right = b.images[-1, :, 0, 0], b.images2[-1, :, 0, 0]
    assert left[2] > left[1] and right[1] > right[2]
    assert nlvr2_label(True) is True and nlvr2_label(" false ") is False and nlvr2_label(1) is None


def test_nlvr2_flat_folders_and_directories_that_are_not_there(tmp_path):
    """A root without split folders holds the images itself; a line's images not in its directory are read
    from beside it; explicit image names are relative to the root."""
    png(tmp_path / "flat" / "dev-1-0-img0.png")
    png(tmp_path / "flat" / "dev-1-0-img1.png")
    png(tmp_path / "flat" / "a.png")
    png(tmp_path / "flat" / "b.png")
    lines = [{"identifier": "dev-1-0-0", "sentence": "s.", "label": "True"},
             {"identifier": "dev-1-0-1", "directory": "4", "sentence": "s.", "label": "False"},
             {"identifier": "dev-2-0-0", "left_image": "a.png", "right_image": "b.png", "sentence": "s.", "label": "True"}]
    (tmp_path / "dev.json").write_text("\n".join(json.dumps(line) for line in lines))
    source = NLVR2(image_root=str(tmp_path / "flat"))
    raw = [ex for shard in source.shards(str(tmp_path / "dev.json"), "val") for ex in source.read(shard)]
    assert [ex.get("bad") for ex in raw] == [None, None, None]
    assert [ex["image_path"] for ex in raw] == [str(tmp_path / "flat" / n) for n in
                                                ("dev-1-0-img0.png", "dev-1-0-img0.png", "a.png")]


def test_nlvr2_split_template_is_quoted_for_hydra_as_typed():
    """``data.source.image_root=DIR/{split}_images`` (a shell has taken any quotes off) composes as written."""
    from vlm.cli import compose_train, quote_brace_ranges

    argv = quote_brace_ranges(["task=nlvr2", "data=nlvr2", "data.train_files=/d/train.json",
                               "data.source.image_root=/d/{split}_images"])
    assert compose_train(argv).data.source.image_root == "/d/{split}_images"


def test_karpathy_retrieval_all_captions_and_an_entry_without(tmp_path, tokenizer):
    path = export.write_coco_karpathy(tmp_path, {"train": 3, "val": 2, "test": 1}, captions_per_image=5)
    data = json.loads(open(path).read())
    data["images"][3]["sentences"] = []  # a val image with no captions
    open(path, "w").write(json.dumps(data))
    source = CocoKarpathy(per="image", cache_dir=str(tmp_path / "cache"))
    batches, skipped = stream(source, path, RetrievalCollator(tokenizer, 24), split="val")
    assert skipped == {"missing_caption": 1}
    (b,) = batches
    assert len(b) == 1 and b.captions_ids.shape[0] == 5 and b.captions_image.tolist() == [0] * 5


def test_synthetic_questions_and_pairs(synthetic, tokenizer):
    files = f"{synthetic.root}/val-*.tar"
    scenes = [ex for shard in WebDataset().shards(files, "val")[:1] for ex in WebDataset().read(shard)]
    questions = [ex for shard in SyntheticVQA().shards(files, "val")[:1] for ex in SyntheticVQA().read(shard)]
    assert len(questions) == sum(len(ex["extra"]["qa"]) for ex in scenes)
    assert questions[0]["boxes"] == scenes[0]["boxes"]  # the region embedder reads the scene's boxes
    assert questions[0]["key"] == f"{scenes[0]['key']}-q0" and questions[0]["extra"]["answers"] == [scenes[0]["extra"]["qa"][0]["answer"]] * 10
    pairs = list(SyntheticNLVR2(seed=synthetic.seed).read(SyntheticNLVR2().shards(files, "val")[0]))
    by_key = {ex["key"]: ex["image"] for ex in scenes}
    objects = {ex["key"]: ex["extra"]["objects"] for ex in scenes}
    counted = 0
    for ex, scene in zip(pairs, scenes):
        assert ex["key"] == scene["key"] and ex["image"] == scene["image"] and ex["boxes"] == scene["boxes"]
        _, _, right = balanced_statement(synthetic.seed, "val", int(scene["key"].rpartition("-")[2]),
                                         int(scene["extra"]["pair"]["partner"].rpartition("-")[2]))
        right_objs = layout(synthetic.seed, "val", right)[2]
        assert ex["image2"] == scene_jpeg(synthetic.seed, "val", right) and len(ex["boxes2"]) == len(right_objs)
        partner = f"val-{right:07d}"
        if partner in by_key:  # a right scene of the split is its file, byte for byte
            assert ex["image2"] == by_key[partner] and len(objects[partner]) == len(right_objs)
        # the label is the truth of the statement, from the objects of both scenes
        n_left = len(objects[ex["key"]])
        if ex["text"] == "the left image has more shapes than the right image.":
            assert ex["extra"]["label"] == (n_left > len(right_objs))
            counted += 1
        if ex["text"] == "the right image has more shapes than the left image.":
            assert ex["extra"]["label"] == (len(right_objs) > n_left)
            counted += 1
        match = re.fullmatch(r"the right image contains an? (\w+) (\w+)\.", ex["text"])
        if match:
            assert ex["extra"]["label"] == any((o.color, o.shape) == match.groups() for o in right_objs)
            counted += 1
    assert counted > 0
    assert Image.open(io.BytesIO(ex["image2"])).size[0] > 0
    labels = [ex["extra"]["label"] for ex in pairs]
    assert 0.35 < sum(labels) / len(labels) < 0.65  # balanced, as NLVR2: the trivial classifier scores 0.5
