"""The speed reports' own logic on tiny models (no timing is checked): the native-resolution comparison against
transformers, and the GPU report's measurement, here on the CPU."""

import math

import pytest
import torch

from vlm.bench import gpu, native
from vlm.bench.__main__ import main
from vlm.cli import compose_model
from vlm.tasks.base import build_model

TINY = ("model.hidden_size=32", "model.num_heads=2", "model.num_layers=1", "model.dropout=0.0")


def test_native_inputs_have_the_shapes_a_researchers_batch_has():
    x = native.native_inputs(24, vocab=100)
    areas = [r * c for r, c in x["grids"]]
    aspects = [c / r for r, c in x["grids"]]
    assert min(areas) >= 24 and max(areas) <= 240 and max(areas) - min(areas) > 100
    assert 1 / 3.6 < min(aspects) < 0.5 and 2 < max(aspects) < 3.6  # 1:3 to 3:1, to a patch's rounding
    assert min(x["lengths"]) >= 8 and max(x["lengths"]) <= 40
    for i, ((r, c), n) in enumerate(zip(x["grids"], x["lengths"])):
        assert int(x["pixel_mask"][i].sum()) == r * c * 32 * 32 and int(x["attn"][i].sum()) == n


def test_native_comparison_checks_every_example_and_sets_the_speed_up_against_the_token_ratio():
    from vlm.models.weights import to_hf_vilt

    torch.manual_seed(0)
    ours, _ = build_model(compose_model("vilt_tiny", *TINY, "model.layer_norm_eps=1e-12",
                                        "model.embedder.max_tokens=-1"), 100)
    result = native.compare(ours, to_hf_vilt(ours), [5], repeats=1, seq_len=64, precision="fp32",
                            patches=(2, 30), text=(3, 12))
    check = result["check"]
    assert check["equal"] and all(len(v) == 5 for v in check["per_example"].values())
    assert max(check["max"].values()) < 1e-5
    (row,) = result["rows"]
    assert row["token_ratio"] == row["slots_padded"] / row["slots_packed"] > 1
    assert math.isclose(row["share_of_token_ratio"], row["packed_over_padded"] / row["token_ratio"])
    assert row["forward_gflop_padded"] > 0 and row["forward_gflop_packed"] > 0
    assert row["padding_packed"] < row["padding_padded"] and row["seq_len"] >= 64
    assert set(row["times_s"]) == {"transformers", "padded", "packed"}
    assert not ours.packing.enabled  # left as it was found


def test_gpu_measurement_runs_its_cases_and_counts_their_flops():
    model, _ = build_model(compose_model("vilt_tiny", *TINY), 100)
    rows = gpu.measure(model, torch.device("cpu"), [3], seq_len=512, cases=("padded", "packed"), warmup=0, steps=1)
    padded, packed = rows
    assert (padded["case"], packed["case"]) == ("padded", "packed")
    assert padded["flops"] > 0 and packed["flops"] > 0 and packed["padding"] < padded["padding"]
    assert all(r["samples_per_s"] > 0 for r in rows)
    late = gpu.measure(model, torch.device("cpu"), [3], seq_len=512, cases=("padded",), deadline=0.0)
    assert late == [{"case": "padded", "batch": 3, "skipped": "time budget spent"}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report on a machine without CUDA")
def test_the_gpu_report_without_cuda_says_so_on_one_line_and_writes_nothing(tmp_path, capsys):
    main(["gpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out
    assert not (tmp_path / "gpu.json").exists()
