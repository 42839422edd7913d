#!/usr/bin/env bash
# The default model's prepared GPU run: train (experiment=train_tiny_gpu, ~7 min on an H200), export, and
# evaluate in one go: ShapesEval of the fixed suite at the default sampling and at cfg 1, and the stage probe
# (its piq metrics; ST-LPIPS and FID need packages too large to send, so run those here afterwards).
#
#   bash scripts/gpu_wheels.sh                      # once, here: the packages the GPU image lacks
#   device run: bash scripts/gpu_train.sh           # carry [".whl"], timeout_s 600
#
# Results go to $OUT (the device tool's folder; outputs/gpu_train elsewhere): tiny/ (the model files, ready for
# checkpoints/tiny), runs.tar.gz (the run folders without images) and log.txt. The device tool returns files of up
# to 16 MiB, so a weights file over 15 MB (the fp16 transformer is ~18 MB) comes back in 15 MB parts; rejoin with
#   cat tiny/transformer.safetensors.part-* > tiny/transformer.safetensors && rm tiny/transformer.safetensors.part-*
# Extra arguments are overrides for the training run, e.g. a CPU smoke run:
#   bash scripts/gpu_train.sh device=cpu train.data_workers=1 train.vae.steps=2 train.transformer.steps=2
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-outputs/gpu_train}"
runs="$out/runs"
source scripts/gpu_setup.sh

common=(logger=none "model.checkpoint_dir=$(realpath "$out")/tiny")
python3 run.py experiment=train_tiny_gpu logger=none "train.export_dir=$(realpath "$out")/tiny" \
    "hydra.run.dir=$runs/train" "$@"
device=$(python3 -c "import json; print(json.load(open('$out/tiny/config.json'))['training']['device'])")
python3 run.py experiment=generate "${common[@]}" "device=$device" generate.fid=false "hydra.run.dir=$runs/generate"
python3 run.py experiment=generate "${common[@]}" "device=$device" generate.fid=false model.sampling.cfg=1 \
    "hydra.run.dir=$runs/generate_cfg1"
python3 run.py experiment=stage_probe "${common[@]}" "device=$device" 'metrics.names=[shapes_composition,shapes_eval,ms_ssim,ssim,gmsd]' \
    "hydra.run.dir=$runs/stage_probe"
python3 - "$runs" <<'PY'
import json, sys
runs = sys.argv[1]
for name in ("generate", "generate_cfg1"):
    scores = json.load(open(f"{runs}/{name}/summary.json"))["shapes_eval"]
    print(f"{name}: ShapesEval {scores['overall']:.3f}", {k: round(v, 3) for k, v in scores["per_category"].items()})
probe = json.load(open(f"{runs}/stage_probe/summary.json"))
print("stages:", {k: probe[k] for k in ("semantic_end", "structure_end", "refinement_start")})
PY
tar czf "$out/runs.tar.gz" --exclude=images --exclude=train_state.pt -C "$out" runs
rm -rf "$runs"
for weights in "$out"/tiny/*.safetensors; do
    if [ "$(stat -c %s "$weights")" -gt 15000000 ]; then split -b 15M -d "$weights" "$weights.part-" && rm "$weights"; fi
done
