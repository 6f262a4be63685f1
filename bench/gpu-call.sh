#!/usr/bin/env bash
# One call on the lent GPU machine (docs/benchmarks.md says how it is sent):
#   bench/gpu-call.sh fidelity   # 8-layer proxies: every kernel, both checkpoints
#   bench/gpu-call.sh full       # the 80-layer benchmark with its baselines
# Expects the wheels in ../.whl (scripts/gpu-wheels) and, if a previous call
# brought them back, GPTQModel's compiled kernels as kcache/ext.tgz.* here.
set -uo pipefail
MODE=${1:-fidelity}
START=$(date +%s)
left() { echo $(( ${1} - ($(date +%s) - START) )); }
export PYTHONUNBUFFERED=1 GPTQMODEL_TORCH_EXTENSIONS_DIR=/tmp/gptq-ext TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site ../.whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/gptq-ext
if ls kcache/ext.tgz.* >/dev/null 2>&1; then
    cat kcache/ext.tgz.* | tar xz -C /tmp/gptq-ext && echo "kernels restored: $(find /tmp/gptq-ext -name '*.so' | wc -l) libraries"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ "$MODE" = fidelity ]; then
    timeout "$(left 430)" python3 -m bench.gpu_fidelity --layers 8 --out "$OUT/fidelity.json" "${@:2}" 2>&1 | tee "$OUT/fidelity.log"
    if ! ls kcache/ext.tgz.* >/dev/null 2>&1; then
        (cd /tmp/gptq-ext && find . -name '*.so' -exec strip --strip-unneeded {} \; \
            && tar czf - $(find . -name '*.so')) | split -b 15m - "$OUT/ext.tgz."
        ls -la "$OUT"
    fi
    timeout "$(left 575)" python3 -m bench.gpu --layers 8 --batches 1,32 --new-tokens 32 \
        --baseline-max 2 --out "$OUT/smoke.json" 2>&1 | tail -40 | tee "$OUT/smoke.log"
else
    timeout "$(left 585)" python3 -m bench.gpu --out "$OUT/full.json" "${@:2}" 2>&1 | tee "$OUT/full.log"
fi
echo "call took $(( $(date +%s) - START )) s"
