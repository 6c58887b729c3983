#!/usr/bin/env bash
# The objectives study in one go: the 12-job sweep of experiment=objectives (4 arms x 3 seeds, one job after
# another), then the table. Usage: experiments/objectives/run.sh DATA_DIR LOG_DIR
set -euo pipefail
data=${1:-data}
logs=${2:-logs}
py=${PY:-python}
sweep="$logs/pretrain/multiruns/objectives"
$py -m vlm.train -m experiment=objectives paths.data_dir="$data" paths.log_dir="$logs" hydra.sweep.dir="$sweep"
$py experiments/objectives/gather.py "$sweep"
