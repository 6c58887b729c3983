#!/usr/bin/env bash
# The pretraining comparison, end to end, one job after another (run from the repository root, ideally a frozen
# worktree; DEST is where each job's raw results are copied as it ends, default this folder's raw/):
#   1. a learning rate per arm, picked on a short budget (hparams_search=tune_lr, 1,600 pairs, seed 0)
#   2. equal steps: every arm at 400 steps of 16, seeds 0-2, at its tuned rate
#   3. equal FLOPs: patches at the grid arm's mean training FLOPs of step 2 (trainer.budget.flops)
#   4. three more region seeds at equal steps (its three first seeds were too far apart for an interval)
#   5. the image control: region (the declared control) and patch on the dot scenes, every ITM negative a foil
#      (not run for the committed study: README.md)
set -euo pipefail
PY=${PY:-python}
DEST=${DEST:-experiments/compare_embedders/raw}
L=logs/compare_embedders
T=$L/tune_lr S=$L/pretrain/steps F=$L/pretrain/flops C=$L/control
sync() { mkdir -p "$DEST" && tar -C "$L" --exclude=checkpoints --exclude=wandb -cf - . | tar -C "$DEST" -xf -; }
(while sleep 60; do sync; done) & copier=$!
trap 'kill $copier 2>/dev/null; sync' EXIT
stamp() { echo "$(date -u +%FT%TZ) $*" | tee -a "$DEST/../wall_clock.log"; }
mkdir -p "$DEST"

stamp tune_lr start
$PY -m vlm.train -m experiment=compare_embedders hparams_search=tune_lr model/embedder=patch,grid,region \
  task.optimizer.lr=3e-4,1e-3,3e-3 task.retrieval_pairs=0 hydra.sweep.dir=$T
$PY -m vlm.tune $T --metric val/loss_itc --direction minimize
stamp tune_lr end

stamp steps start
$PY -m vlm.train -m -cd $T +tuned=lr experiment=compare_embedders seed=0,1,2 model/embedder=patch,grid,region \
  hydra.sweep.dir=$S
stamp steps end

FLOPS=$($PY -c "
import glob, json
runs = [json.load(open(p)) for p in glob.glob('$S/*/results.json')]
spent = [r['budget']['spent']['flops'] for r in runs if r['label'] == 'grid']
print(f'{sum(spent) / len(spent):.3e}')")
stamp flops start "trainer.budget.flops=$FLOPS"
$PY -m vlm.train -m -cd $T +tuned=lr experiment=compare_embedders seed=0,1,2 model/embedder=patch \
  trainer.budget.flops=$FLOPS trainer.max_steps=100000 hydra.sweep.dir=$F
stamp flops end

stamp region_seeds start
$PY -m vlm.train -m -cd $T +tuned=lr experiment=compare_embedders seed=3,4,5 model/embedder=region \
  hydra.sweep.dir=$L/pretrain/steps_region_more_seeds
stamp region_seeds end

stamp control start
$PY -m vlm.train -m -cd $T +tuned=lr experiment=compare_embedders data=synthetic_control \
  task.collate.itm_foil_fraction=1.0 seed=0,1,2 model/embedder=region,patch hydra.sweep.dir=$C
stamp control end
