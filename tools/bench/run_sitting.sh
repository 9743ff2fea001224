#!/usr/bin/env bash
# One sitting: the PyTorch peer (no-mmap malloc) and ours, alternated, on this machine.
# Usage (repo root): bash tools/bench/run_sitting.sh [OUT_DIR]
# (vig.py prints its dpr/num_knn lists on stdout: only the JSON lines are kept.)
# PEER_DIR: the peer harness's folder (default: shared/peer_vig beside the repository's
# root); PEER_PYTHON: its venv's python (default /tmp/peer-venv/bin/python). Set them up
# with bash "$PEER_DIR/setup.sh" GIT_DIR.
set -u
out=${1:-experiments/results/bench}; mkdir -p "$out"
root=$(cd "$(dirname "$0")/../.." && pwd)
PEER_DIR=${PEER_DIR:-$root/../shared/peer_vig}
peer=$PEER_DIR/bench.py; P=${PEER_PYTHON:-/tmp/peer-venv/bin/python}
nommap="MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736"
log() { echo "$(date -u +%FT%TZ) $(cut -d' ' -f1-3 /proc/loadavg) $*" | tee -a "$out/sitting.log"; }
log "start $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cpus"
log "peer c32 infer";  env $nommap $P $peer --variant c32 --mode infer --batch 128 | grep "^{" >> "$out/peer.jsonl"
log "peer c32 train";  env $nommap $P $peer --variant c32 --mode train --batch 128 | grep "^{" >> "$out/peer.jsonl"
log "ours vig_ti_32";  python -m experiments.bench --model vig_ti_32 --batch 128 --methods fp --steps 5 \
    --warmup 1 --json "$out/ours_vig_ti_32_b128.json" --noprogress
log "peer 224 infer";  env $nommap $P $peer --variant 224 --mode infer --batch 32 | grep "^{" >> "$out/peer.jsonl"
log "peer 224 train";  env $nommap $P $peer --variant 224 --mode train --batch 32 --iters 5 | grep "^{" >> "$out/peer.jsonl"
log "ours vig_ti_224"; python -m experiments.bench --model vig_ti_224 --batch 32 --methods fp --steps 5 \
    --warmup 1 --json "$out/ours_vig_ti_224_b32.json" --noprogress
log "done"
