import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT, compose_config
from vlm.config import check
from vlm.errors import ConfigError
from vlm.tasks.base import HANDLED


def run_train(*overrides):
    return subprocess.run(
        [sys.executable, "-m", "vlm.train", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_unknown_key_fails_at_start_on_one_line():
    res = run_train("model.no_such_key=1")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_key" in lines[0], res.stderr


def test_appended_unknown_key_is_caught_by_the_signature_check():
    cfg = compose_config(["+model.no_such_key=1"])
    with pytest.raises(ConfigError, match="model.no_such_key"):
        check(cfg, handled=HANDLED)


@pytest.mark.parametrize(
    "override, key",
    [("model.hidden_size=wide", "model.hidden_size"), ("data.shuffle=3", "data.shuffle"), ("task.optimizer.lr=fast", "task.optimizer.lr")],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check(compose_config([override]), handled=HANDLED)


def test_default_config_passes_the_check():
    check(compose_config([]), handled=HANDLED)


def test_nested_targets_are_checked():
    cfg = OmegaConf.create({"a": {"b": {"_target_": "vlm.models.detector.build_detector", "returned_layers": [2, "x"]}}})
    with pytest.raises(ConfigError, match=r"a\.b\.returned_layers"):
        check(cfg)


BAD_VALUES = [  # override(s), what the one line must say
    (["data.batch_size=-8"], "'data.batch_size' = -8: expected an int >= 1"),
    (["trainer.max_steps=-1"], "'trainer.max_steps' = -1: expected an int >= 1"),
    (["task.optimizer.lr=-1"], "'task.optimizer.lr' = -1: expected a float > 0"),
    (["trainer.val_check_interval=0"], "'trainer.val_check_interval' = 0: expected an int >= 1"),
    (["data.tokenizer=/nonexistent"], "data.tokenizer=/nonexistent: no such directory"),
    (["model.hidden_size=100", "model.num_heads=3"],
     "model.hidden_size=100 is not divisible by model.num_heads=3: choose model.num_heads from 1, 2, 4, 5, 10, 20, 25, 50, 100"),
    (["model.num_layers=0"], "'model.num_layers' = 0: expected an int >= 1"),
    (["task.collate.mlm_prob=1.5"], "'task.collate.mlm_prob' = 1.5: expected a float >= 0 and <= 1"),
    (["data.micro_batch_size=0"], "'data.micro_batch_size' = 0: expected an int >= 1 or null"),
    (["model.init_from=/no/such.pth"], "model.init_from=/no/such.pth: no such file or directory"),
]


@pytest.mark.parametrize("overrides, message", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_values_fail_before_anything_is_built(overrides, message, tmp_path, monkeypatch):
    import vlm.train

    def refuse(*a, **k):
        raise AssertionError("something was built before the config was checked")

    monkeypatch.setattr(vlm.train, "instantiate", refuse)
    cfg = compose_config([*overrides, f"paths.data_dir={tmp_path}", "logger=none"], output_dir=str(tmp_path))
    with pytest.raises(ConfigError) as e:
        vlm.train.build(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_bad_value_is_one_line_on_the_command_line():
    res = run_train("data.batch_size=-8", "logger=none")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines == ["vlm.train: error: config key 'data.batch_size' = -8: expected an int >= 1"], res.stderr


def test_an_unknown_option_lists_every_available_one():
    res = run_train("model/embedder=nonexistent")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "available options in 'model/embedder': frames, grid, patch, region, single_frame, tubelet" in lines[0], res.stderr


def test_the_first_error_is_reported_when_a_clean_up_raises_over_it(capsys):
    """Lightning's teardown can raise while our error propagates; the user must see ours, on one line."""
    from vlm.errors import DataError, reported

    with pytest.raises(SystemExit) as e, reported("vlm.train"):
        try:
            raise ConfigError("data.num_workers: the checkpoint was written with 2")
        except ConfigError:
            raise RuntimeError("Please call `iter(combined_loader)` first.")
    assert e.value.code == 2
    assert capsys.readouterr().err == "vlm.train: error: data.num_workers: the checkpoint was written with 2\n"
    with pytest.raises(SystemExit), reported("vlm.train"):  # as a DataLoader worker re-raises it
        raise DataError("Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
                        '  File "x.py", line 1\nvlm.errors.DataError: no usable sample in a whole pass over a.tar')
    assert capsys.readouterr().err == "vlm.train: error: no usable sample in a whole pass over a.tar\n"
    with pytest.raises(KeyError), reported("vlm.train"):  # anything else goes through as it is
        raise KeyError("x")
