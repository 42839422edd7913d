#!/usr/bin/env bash
# The prepared GPU measurement (experiment=device_benchmark): Infinity-2B with random weights at 1024 x 1024 in
# bf16, the baseline and every acceleration policy at batch 1 and 4, interleaved; latency with its spread,
# speedup against MAC speedup, TFLOP/s against the bf16 peak, peak memory, host syncs, bf16-vs-fp32 logits, and a
# profile of one generation.
#
#   bash scripts/gpu_wheels.sh                        # once, here: the packages the GPU image lacks (Hydra)
#   device run: bash scripts/device_benchmark.sh      # carry [".whl"], timeout_s 600
#
# Results go to $OUT (the device tool's folder; outputs/device_benchmark elsewhere): summary.json, the table
# (device_benchmark.csv), profile.txt, run.tar.gz (the whole run folder) and log.txt. Extra arguments are
# overrides, e.g. model=infinity8b model.random_init=true, or model=tiny device=cpu for a small run here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-outputs/device_benchmark}"
source scripts/gpu_setup.sh

run="$out/run"
python3 run.py experiment=device_benchmark logger=none "hydra.run.dir=$run" "$@"
cp "$run/summary.json" "$run/tables/device_benchmark.csv" "$out/"
[ -f "$run/profile.txt" ] && cp "$run/profile.txt" "$out/"
tar czf "$out/run.tar.gz" -C "$out" run
rm -rf "$run"
