# Sourced by the prepared GPU scripts after they set $out: installs the carried wheels (.whl/, see
# scripts/gpu_wheels.sh), copies all output to $out/log.txt and says which GPU runs.
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec > >(tee "$out/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "no GPU: running on the CPU"
