#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the pure-Python packages that the GPU machine's image lacks (it has torch,
# numpy, matplotlib, scipy, safetensors, tqdm, but no Hydra or piq), as wheels in .whl/ for scripts/gpu_train.sh.
#   bash scripts/gpu_wheels.sh
# .whl/ is git-ignored; the device tool sends it along when its run names it in `carry`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rm -rf .whl
python3 -m pip wheel --quiet --no-deps --wheel-dir .whl \
    hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 piq==0.8.0
ls .whl
