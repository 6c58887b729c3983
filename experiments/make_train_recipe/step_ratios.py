"""The training step of make train's recipe against its variants, in one process, alternated (fp32 unless --bf16).

    python experiments/make_train_recipe/step_ratios.py [--bf16] [--repeats 8]

A batch shaped like the recipe's (64 pairs, 160 x 256 images: 5 x 8 = 40 patches, 28 text tokens), each arm a
full step (ITM + MLM passes, WPA, backward, AdamW) on the same batch; medians, and the ratio to the first arm.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vlm.cli import compose_train
from vlm.bench.fixtures import random_batch
from vlm.precision import autocast
from vlm.tasks.base import build_model

ARMS = {  # the arm -> overrides of make train's config
    "4 layers, MLM on all (the old recipe)": ["model.num_layers=4", "task.mlm_batch_fraction=1.0"],
    "4 layers, MLM on half": ["model.num_layers=4"],
    "3 layers, MLM on all": ["task.mlm_batch_fraction=1.0"],
    "3 layers, MLM on half (make train)": [],
    "2 layers, MLM on half": ["model.num_layers=2"],
    "3 layers, MLM on half, no WPA": ["task.objectives.wpa=0"],
}


def task_for(overrides: list[str]):
    cfg = compose_train(overrides)
    torch.manual_seed(0)
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg.task, resolve=True)
    node.pop("collate")
    task = instantiate(node, model=build_model(cfg.model, 4096)[0]).train()
    return task, torch.optim.AdamW(task.parameters(), lr=1e-4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--repeats", type=int, default=8)
    a = p.parse_args()
    precision = "bf16" if a.bf16 else "fp32"
    batch = random_batch(64, 28, 160, 256, 4096)
    batch.itm_labels = torch.arange(64) % 2
    batch.itm_index = torch.where(batch.itm_labels.bool(), torch.arange(64), torch.arange(64).roll(1))
    arms = {name: task_for(o) for name, o in ARMS.items()}

    def step(task, opt) -> float:
        t = time.perf_counter()
        with autocast(precision):
            loss = task.compute(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for task, opt in arms.values():
        step(task, opt), step(task, opt)  # warm-up
    times = {name: [] for name in arms}
    for r in range(a.repeats):
        order = list(arms.items()) if r % 2 == 0 else list(arms.items())[::-1]
        for name, (task, opt) in order:
            times[name].append(step(task, opt))
    ref = statistics.median(times[next(iter(arms))])
    print(f"{precision}, {torch.get_num_threads()} threads, medians of {a.repeats} alternated steps")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:40s} {1e3 * med:6.0f} ms  {med / ref:.2f}x  (range {1e3 * min(ts):.0f}-{1e3 * max(ts):.0f})")


if __name__ == "__main__":
    main()
