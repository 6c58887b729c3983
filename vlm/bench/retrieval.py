"""Exhaustive against two-stage retrieval ranking on one fine-tuned model and the same eval pairs: wall time and
R@1/5/10 both ways.

Exhaustive ranking runs the cross-encoder on every (image, text) pair, N^2 passes; two-stage ranking shortlists
k candidates per query by the model's own dual-encoder (ITC) embeddings and re-ranks only those, at most 2Nk
passes (`vlm.tasks.ranking.rerank_shortlists`). Both arms start from the same gathered visual tokens; each
arm's time counts what it needs: exhaustive the visual tokens alone, two-stage also the unimodal passes that
give the ITC embeddings.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from vlm.bench.common import FAST, timed
from vlm.precision import autocast

WHAT = "retrieval: exhaustive vs two-stage ranking of a task=retrieval checkpoint (--ckpt): seconds, R@1/5/10"
METRICS = ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10")


def gather(task, dm, images: int, itc: bool) -> None:
    """The eval split's first ``images`` images and their captions into the task's cache (with ITC embeddings
    where ``itc``), as its validation steps gather them."""
    import torch

    task._start()
    task.eval_images = images
    weight = task.itc_weight
    task.itc_weight = weight if itc else 0.0
    try:
        with torch.no_grad(), autocast(FAST):
            for batch in dm.val_dataloader():
                task._gather(batch.to(task.device).normalized())
                if sum(len(v.embeds) for v in task._cache["visual"]) >= images:
                    break
    finally:
        task.itc_weight = weight


def rank(task, k: int | None) -> dict[str, float]:
    import torch

    with torch.no_grad(), autocast(FAST):
        return task.rank(k)


def run(args) -> dict:
    from vlm.cli import compose_config
    from vlm.errors import ConfigError
    from vlm.evaluate import build

    if not args.ckpt:
        raise ConfigError("retrieval: --ckpt is required: a task=retrieval checkpoint, e.g. from python -m vlm.train "
                          "task=retrieval data=synthetic_retrieval model.init_from=<make train's last.ckpt>")
    cfg = compose_config("eval", ["task=retrieval", "data=synthetic_retrieval", f"ckpt_path={args.ckpt}",
                                  "data.batch_size=64", "data.shuffle=false", f"paths.output_dir={args.out}"])
    dm, task, _ = build(cfg)
    dm.prepare_data()
    dm.setup("validate")
    task.eval()
    if task.itc_weight == 0:
        raise ConfigError(f"retrieval: {args.ckpt} was trained with task.itc_weight=0: no dual encoder to shortlist by")

    n = args.pairs
    gather(task, dm, min(n, 64), itc=True)  # warm-up, not counted
    t_plain = timed(lambda: gather(task, dm, n, itc=False))
    result = {"exhaustive": {}}
    t = timed(lambda: result["exhaustive"].update(rank(task, None)))
    exhaustive = result["exhaustive"]
    exhaustive.update(seconds=t_plain + t, rank_seconds=t, embed_seconds=t_plain)
    t_itc = timed(lambda: gather(task, dm, n, itc=True))
    for k in args.ks:
        row: dict[str, float] = {}
        t = timed(lambda: row.update(rank(task, k)))
        row.update(seconds=t_itc + t, rank_seconds=t, embed_seconds=t_itc)
        result[f"two-stage k={k}"] = row
    for row in result.values():
        row["speedup"] = exhaustive["seconds"] / row["seconds"]
        row["delta_r1_points"] = 100 * min(row["ir_r1"] - exhaustive["ir_r1"], row["tr_r1"] - exhaustive["tr_r1"])
    meets = [name for name, row in result.items()
             if name != "exhaustive" and row["speedup"] >= 10 and row["delta_r1_points"] >= -1]

    import torch
    table = Table(title=f"retrieval ranking of {args.ckpt}: {int(exhaustive['images'])} images x "
                        f"{int(exhaustive['texts'])} texts of the built-in val split, {FAST}, "
                        f"{torch.get_num_threads()} threads")
    for col in ("ranking", "pairs scored", "s (embed + rank)", "speedup", *(m.replace("_r", " R@") for m in METRICS),
                "ITC alone ir/tr R@1"):
        table.add_column(col, justify="right")
    for name, r in result.items():
        table.add_row(name, f"{int(r['pairs_scored']):,}", f"{r['seconds']:.1f} ({r['embed_seconds']:.1f} + "
                      f"{r['rank_seconds']:.1f})", f"{r['speedup']:.1f}x", *(f"{100 * r[m]:.1f}" for m in METRICS),
                      f"{100 * r['itc_ir_r1']:.1f} / {100 * r['itc_tr_r1']:.1f}" if "itc_ir_r1" in r else "-")
    Console(width=200).print(table)
    print("≥ 10x faster with R@1 within 1 point of exhaustive (both directions): "
          + (", ".join(meets) if meets else "none of the k tried"))
    return {"ckpt": str(args.ckpt), "pairs": n, "precision": FAST, "rows": result, "meets_target": meets}
