#!/usr/bin/env bash
# The objectives study, as it was run: two sequential Hydra multiruns of experiment=objectives (the full
# mix and the mix without WPA first, since they answer the main question; then without MLM and without
# ITM), then the table. Usage: experiments/objectives/run.sh DATA_DIR LOG_DIR
set -euo pipefail
# One intra-op thread: on a CPU shared with other jobs, two threads spend most of a step waiting for each
# other (python -m vlm.bench threads at load average 12: a vilt_tiny step took 5.2x longer with 2 threads).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
data=${1:-data}
logs=${2:-logs}
py=${PY:-python}
full='{itm:1.0,mlm:0.25,wpa:0.1,mpp:0.0}'
no_wpa='{itm:1.0,mlm:0.25,wpa:0.0,mpp:0.0}'
no_mlm='{itm:1.0,mlm:0.0,wpa:0.1,mpp:0.0}'
no_itm='{itm:0.0,mlm:0.25,wpa:0.1,mpp:0.0}'
nice -n 5 $py -m vlm.train -m experiment=objectives "task.objectives=$full,$no_wpa" \
  paths.data_dir="$data" paths.log_dir="$logs" hydra.sweep.dir="$logs/pretrain/multiruns/objectives-1"
nice -n 5 $py -m vlm.train -m experiment=objectives "task.objectives=$no_mlm,$no_itm" \
  paths.data_dir="$data" paths.log_dir="$logs" hydra.sweep.dir="$logs/pretrain/multiruns/objectives-2"
$py experiments/objectives/gather.py "$logs/pretrain/multiruns/objectives-1" "$logs/pretrain/multiruns/objectives-2"
