#!/usr/bin/env bash
# The downstream embedder comparison, stage after stage, from the repository root (README.md here: what and why).
# Each stage's results.json, metrics.csv and .hydra/ configs are copied into experiments/downstream/raw/ as the
# stage ends (python -m vlm.compare reads raw/ as it reads logs/).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-experiments/downstream}
SEEDS=${SEEDS:-0,1,2}
FT_STEPS=${FT_STEPS:-200}    # fine-tuning steps per job
K=${K:-16}                   # retrieval: two-stage shortlist per query (python -m vlm.bench retrieval: 36x exhaustive's speed at 1,000)
TASKS=${TASKS:-vqa nlvr2 retrieval}
STAGE=${STAGE:-1}            # 1b: from the equal-time arm on; 2: skip the pretraining, whose checkpoints are there
FT=(pretrain_seed=0 seed=$SEEDS trainer.max_steps=$FT_STEPS trainer.val_check_interval=$FT_STEPS)
copy() {  # the raw results of every finished job so far
  (cd logs && find compare_embedders_downstream \( -name results.json -o -name metrics.csv -o -path "*/.hydra/*.yaml" \) \
    -print) | while read -r f; do
    mkdir -p "$OUT/raw/$(dirname "$f")" && cp "logs/$f" "$OUT/raw/$f"
  done
}
if [ "$STAGE" = 1 ]; then
# 1. pretrain each embedder, equal steps
$PY -m vlm.train -m experiment=compare_embedders_downstream_pretrain model/embedder=patch,grid,region seed=0 "$@"
copy
fi
if [ "$STAGE" = 1 ] || [ "$STAGE" = 1b ]; then
# 1b. patches at the grid arm's pretraining wall-clock (equal time, not equal steps): PET_STEPS, or from stage 1's
# fit times (clean only when stage 1 ran alone on the machine)
STEPS=${PET_STEPS:-$($PY - <<'PY'
import json
ms = {e: json.load(open(f"logs/compare_embedders_downstream/pretrain/{e}-s0/results.json"))["summary"]["time/fit_s"]
      for e in ("patch", "grid")}
print(round(600 * ms["grid"] / ms["patch"]))
PY
)}
echo "patch_equal_time: $STEPS pretraining steps"
$PY -m vlm.train -m experiment=compare_embedders_downstream_pretrain model/embedder=patch seed=0 label=patch_equal_time \
  trainer.max_steps=$STEPS trainer.val_check_interval=$STEPS 'hydra.sweep.subdir=patch_equal_time-s${seed}' "$@"
copy
fi
# 2. fine-tune every pretrained arm on each task, 3 seeds, from pretraining seed 0
for task in $TASKS; do
  extra=(); [ $task = retrieval ] && extra=(task.shortlist_k=$K)
  $PY -m vlm.train -m experiment=compare_embedders_downstream task=$task data=synthetic_$task "${FT[@]}" "${extra[@]}" \
    model/embedder=patch,grid,region "$@"
  copy
  $PY -m vlm.train -m experiment=compare_embedders_downstream task=$task data=synthetic_$task "${FT[@]}" "${extra[@]}" \
    model/embedder=patch label=patch_equal_time \
    'model.init_from=${paths.log_dir}/compare_embedders_downstream/pretrain/patch_equal_time-s0/checkpoints/last.ckpt' \
    'hydra.sweep.subdir=${hydra:runtime.choices.task}/patch_equal_time-s${seed}' "$@"
  copy
done
$PY -m vlm.compare logs/compare_embedders_downstream --out "$OUT" --metric val/vqa_score
