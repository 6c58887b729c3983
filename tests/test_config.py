import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT, compose_config
from vlm.config import ConfigError, check


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
        check(cfg, derived=frozenset({"model.vocab_size"}))


@pytest.mark.parametrize(
    "override, key",
    [("model.hidden_size=wide", "model.hidden_size"), ("data.shuffle=3", "data.shuffle"), ("task.optim.lr=fast", "task.optim.lr")],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check(compose_config([override]), derived=frozenset({"model.vocab_size"}))


def test_default_config_passes_the_check():
    check(compose_config([]), derived=frozenset({"model.vocab_size"}))


def test_nested_targets_are_checked():
    cfg = OmegaConf.create({"a": {"_target_": "vlm.tasks.optim.OptimConfig", "lr": 1.0, "betas": [0.9, "x"]}})
    with pytest.raises(ConfigError, match=r"a\.betas"):
        check(cfg)
