"""precision: auto picks bf16 only where it is fast, and passes explicit choices through."""

import torch

from vlm import precision


def test_auto_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert precision.resolve("auto", "cpu") == "bf16-mixed"
    assert precision.fast_cpu_precision() == "bf16"
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.resolve("auto", "cpu") == "32-true"
    assert precision.resolve("auto", "gpu") == "bf16-mixed"
    assert precision.fast_cpu_precision() == "fp32"


def test_explicit_precision_is_kept():
    assert precision.resolve("32-true", "cpu") == "32-true"
    assert precision.resolve("bf16-mixed", "cpu") == "bf16-mixed"
    assert precision.resolve(16, "gpu") == "16"


def test_autocast_context():
    x = torch.randn(4, 4)
    with precision.autocast("bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with precision.autocast("fp32"):
        assert (x @ x).dtype == torch.float32


def test_the_cpu_trainer_config_resolves_to_what_is_fast_here():
    import lightning as L

    from vlm.cli import compose_train

    cfg = compose_train(["trainer=cpu"])
    assert cfg.trainer.precision == precision.resolve("auto", "cpu")
    trainer = L.Trainer(accelerator="cpu", precision=cfg.trainer.precision, logger=False, enable_checkpointing=False)
    assert str(trainer.precision) == cfg.trainer.precision
