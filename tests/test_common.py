"""`vlm.common.atomic_write`: the one way files are written whole (checkpoints, shards, region files, results)."""

import pytest
import torch

from vlm.common import atomic_write


def test_a_complete_write_replaces_the_file_through_a_hidden_temp_file_beside_it(tmp_path):
    path = tmp_path / "new" / "weights.pt"
    with atomic_write(path, fsync=True) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".weights.pt.") and tmp.name.endswith(".tmp")
        torch.save({"x": torch.ones(2)}, tmp)
        assert not path.exists()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["weights.pt"]


def test_a_write_that_fails_leaves_the_previous_file_and_no_temp_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("previous")
    with pytest.raises(OSError, match="No space left"), atomic_write(path) as tmp:
        tmp.write_text("half a file")
        raise OSError(28, "No space left on device")
    assert path.read_text() == "previous" and list(tmp_path.iterdir()) == [path]
