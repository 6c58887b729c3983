from collections import Counter

from vlm.report import print_skipped


def test_skip_line_counts_samples_and_shards_apart(capsys):
    print_skipped({"train": Counter(corrupt_image=3, failed_download=1, unreadable_shard=1), "val": Counter(), "test": Counter(x=0)})
    assert capsys.readouterr().out.strip() == (
        "skipped 4 samples and 1 unreadable shards (train: corrupt_image=3, failed_download=1, unreadable_shard=1)"
    )
    print_skipped({"train": Counter(), "val": Counter()})
    assert capsys.readouterr().out.strip() == "skipped 0 samples"


def test_bad_boxes_are_counted_apart_from_samples(capsys):
    print_skipped({"train": Counter(bad_boxes=5, corrupt_image=1, unreadable_shard=2), "val": Counter(bad_boxes=1)})
    assert capsys.readouterr().out.strip() == (
        "skipped 1 samples and 2 unreadable shards, 6 bad boxes (train: bad_boxes=5, corrupt_image=1, unreadable_shard=2; "
        "val: bad_boxes=1)"
    )
