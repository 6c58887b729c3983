"""python -m vlm.bench [REPORT ...] [--out DIR]: the speed reports, as tables and JSON."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from vlm.bench import EXPLICIT, REPORTS


def main(argv: list[str] | None = None) -> None:
    reports = "\n".join(f"  {name:<10} {module.WHAT}" for name, module in REPORTS.items())
    p = argparse.ArgumentParser(prog="python -m vlm.bench", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Speed reports: each prints a table and writes <out>/<report>.json; "
                                            "every comparison is measured side by side in one process, as ratios.",
                                epilog=f"reports (default: all but retrieval, which needs --ckpt, and gpu, which "
                                       f"needs CUDA):\n{reports}")
    default = [name for name in REPORTS if name not in EXPLICIT]

    def report(name: str) -> str:  # not choices=: argparse checks a '*' positional's default list against them
        if name not in REPORTS:
            raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(REPORTS)})")
        return name

    p.add_argument("which", nargs="*", default=default, type=report, metavar="REPORT",
                   help="one or more of: " + ", ".join(REPORTS))
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default: each report's own)")
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="batch sizes (model: 8 32; native: 16 32; gpu: 32 128)")
    p.add_argument("--batch", type=int, default=8, help="embedders: images per timed batch")
    p.add_argument("--detector-weights", help="embedders: the region detector's weights (an experiment=detection checkpoint)")
    p.add_argument("--data-samples", type=int, default=512, help="scenes per format in the data benchmark")
    p.add_argument("--compile", action="store_true",
                   help="model: also time ours with model.compile=true (torch.compile per block; compiling takes minutes); "
                        "packing: also FlexAttention compiled")
    p.add_argument("--seq-len", type=int, default=512, help="packing, native, gpu: tokens per packed row")
    p.add_argument("--ckpt", help="retrieval: a task=retrieval checkpoint to rank with")
    p.add_argument("--pairs", type=int, default=1000, help="retrieval: images (with their captions) ranked")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 128],
                   help="retrieval: two-stage shortlist sizes (candidates per query)")
    p.add_argument("--out", default="bench", help="folder for <report>.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.which:
        result = REPORTS[name].run(args)
        if result is None:  # nothing to measure here (said on one line)
            continue
        result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                             "torch": torch.__version__}
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(f"wrote {out / f'{name}.json'}")


if __name__ == "__main__":
    main()
