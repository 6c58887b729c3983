"""Speed reports (``python -m vlm.bench [REPORT ...]``): each prints a table and writes ``<out>/<report>.json``.

Benchmarks compare side by side in one process (ratios), since machines are noisy; they never assert. They
compute in bf16 autocast where this CPU does so natively and in fp32 where it does not (`vlm.precision`);
bf16 columns are left out on a CPU without native bf16, where they would take ~100x longer. One module per
report, each with ``WHAT`` (a line for ``--help``) and ``run(args) -> dict``.
"""

from vlm.bench import data, embedders, gpu, model, native, packing, retrieval, step, threads, wpa

REPORTS = {"step": step, "model": model, "native": native, "embedders": embedders, "data": data, "wpa": wpa,
           "threads": threads, "packing": packing, "retrieval": retrieval, "gpu": gpu}
EXPLICIT = ("retrieval", "gpu")  # run only when named: retrieval needs --ckpt, gpu a CUDA device
