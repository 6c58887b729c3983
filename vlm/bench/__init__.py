"""Speed reports (``python -m vlm.bench [REPORT ...]``): each prints a table and writes ``<out>/<report>.json``.

Benchmarks compare side by side in one process (ratios), since machines are noisy; they never assert. They
compute in bf16 autocast where this CPU does so natively and in fp32 where it does not (`vlm.precision`);
bf16 columns are left out on a CPU without native bf16, where they would take ~100x longer. One module per
report, each with ``WHAT`` (a line for ``--help``) and ``run(args) -> dict``.
"""

from vlm.bench import data, embedders, model, packing, retrieval, step, threads, wpa

REPORTS = {"step": step, "model": model, "embedders": embedders, "data": data, "wpa": wpa, "threads": threads,
           "packing": packing, "retrieval": retrieval}
