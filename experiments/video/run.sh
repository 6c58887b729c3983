#!/usr/bin/env bash
# The video comparison from image pretraining, one job after another (run from the repository root, ideally a frozen
# worktree, after experiments/compare_embedders/run.sh: each seed's arms start from the patch run of that seed at
# equal FLOPs, inflated by model.init_from, with its tokenizer, the scenes' WordPiece). DEST: where each job's raw
# results are copied as it ends, default this folder's raw/.
set -euo pipefail
PY=${PY:-python}
DEST=${DEST:-experiments/video/raw}
L=logs/compare_video_embedders/inflated
sync() { mkdir -p "$DEST" && tar -C "$L" --exclude=checkpoints --exclude=wandb -cf - . | tar -C "$DEST" -xf -; }
(while sleep 60; do [ -d "$L" ] && sync; done) & copier=$!
trap 'kill $copier 2>/dev/null; sync' EXIT
stamp() { echo "$(date -u +%FT%TZ) $*" | tee -a "$DEST/../wall_clock.log"; }
mkdir -p "$DEST"

stamp video start
$PY -m vlm.train -m experiment=compare_video_embedders seed=0,1,2 model/embedder=tubelet,frames,single_frame \
  'model.init_from=logs/compare_embedders/pretrain/flops/${seed}' 'data.tokenizer=${paths.data_dir}/synthetic/tokenizer' \
  hydra.sweep.dir=$L
stamp video end
