#!/usr/bin/env bash
# One call on the lent GPU machine (docs/benchmarks.md says how it is sent):
#   bench/gpu-call.sh fidelity   # 8-layer proxies: every kernel, both checkpoints (args: bench.gpu_fidelity's;
#                                # SMOKE=0: without the 8-layer benchmark after it)
#   bench/gpu-call.sh full       # the 80-layer benchmark with its baselines
#   bench/gpu-call.sh rowquant   # the row-layout kernels against Marlin, alone
#   bench/gpu-call.sh prefill    # a long prompt's prefill: products, dequantize, glue variants, profile
#   bench/gpu-call.sh probe      # the row kernels without torch (bench/rowquant_probe.cu): seconds to build;
#                                # "probe profile": each kernel once under Nsight Compute (ncu)
# Run from the repository's root. Expects the wheels in .whl (scripts/gpu-wheels)
# and, if a previous call brought them back, GPTQModel's compiled kernels as
# .gpu/kcache/ext.tgz.* and the row kernels as .gpu/kcache/rowquant.tgz (carry
# both folders).
set -uo pipefail
MODE=${1:-fidelity}
START=$(date +%s)
left() { echo $(( ${1} - ($(date +%s) - START) )); }
KC=.gpu/kcache
if [ "$MODE" = probe ]; then  # needs nothing but nvcc: no wheels, no kernels carried
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -o /tmp/probe bench/rowquant_probe.cu \
        > "$OUT/probe-build.log" 2>&1 || { tail -30 "$OUT/probe-build.log"; exit 1; }
    echo "built in $(( $(date +%s) - START )) s"
    if [ "${2:-}" = profile ]; then  # Nsight Compute's counters (the Firecracker machines have them)
        NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
        timeout "$(left 580)" "$NCU" --clock-control none --set full -k regex:'gemv|loads|mma' /tmp/probe profile > "$OUT/probe-ncu.txt" 2>&1
        rc=$?; grep -E "^  [A-Za-z_].*Context|Duration|DRAM Throughput|Compute \(SM\) Throughput|Issue Slots Busy|No Eligible|Achieved Occupancy|Registers Per" "$OUT/probe-ncu.txt" | head -200
        exit $rc
    fi
    timeout "$(left 580)" /tmp/probe "${@:2}" 2>&1 | tee "$OUT/probe.log"
    exit "${PIPESTATUS[0]}"
fi
export PYTHONUNBUFFERED=1 GPTQMODEL_TORCH_EXTENSIONS_DIR=/tmp/gptq-ext TOKENIZERS_PARALLELISM=false \
    XWIN_KERNEL_DIR=/tmp/xwin-kernels
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/gptq-ext /tmp/xwin-kernels
if ls $KC/ext.tgz.* >/dev/null 2>&1; then
    cat $KC/ext.tgz.* | tar xz -C /tmp/gptq-ext && echo "kernels restored: $(find /tmp/gptq-ext -name '*.so' | wc -l) libraries"
fi
carried_stamp=$( [ -f $KC/rowquant.tgz ] && tar xzOf $KC/rowquant.tgz rowquant/stamp 2>/dev/null )
if [ "${carried_stamp%% *}" = "$(python3 -c 'from bot.engine import rowquant; print(rowquant.source_hash())')" ]; then
    # built from this source: newer than it, or ninja would build them again
    tar xzf $KC/rowquant.tgz -C /tmp/xwin-kernels && find /tmp/xwin-kernels -type f -exec touch {} + \
        && echo "row kernels restored"
fi
bring_back_row_kernels() {  # the row kernels if built here (new or changed source), for the next call
    local built=/tmp/xwin-kernels/rowquant
    if [ -f $built/stamp ] && [ "$(cat $built/stamp)" != "$carried_stamp" ] && [ ! -f "$OUT/rowquant.tgz" ]; then
        tar czf "$OUT/rowquant.tgz" -C /tmp/xwin-kernels rowquant
    fi
}
bring_back_gptq_kernels() {  # GPTQModel's JIT-built kernels (Marlin's: ~245 s to build), when none were carried
    if ! ls $KC/ext.tgz.* >/dev/null 2>&1 && [ -n "$(find /tmp/gptq-ext -name '*.so' 2>/dev/null)" ] \
        && ! ls "$OUT"/ext.tgz.* >/dev/null 2>&1; then
        (cd /tmp/gptq-ext && find . -name '*.so' -exec strip --strip-unneeded {} \; \
            && tar czf - $(find . -name '*.so')) | split -b 15m - "$OUT/ext.tgz."
    fi
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ "$MODE" = rowquant ]; then
    timeout "$(left 560)" python3 -m bench.gpu_rowquant --out "$OUT/rowquant.json" "${@:2}" 2>&1 | tee "$OUT/rowquant.log"
    bring_back_row_kernels
elif [ "$MODE" = prefill ]; then
    timeout "$(left 560)" python3 -m bench.gpu_prefill --out "$OUT/prefill.json" "${@:2}" 2>&1 | tee "$OUT/prefill.log"
elif [ "$MODE" = fidelity ]; then
    timeout "$(left 430)" python3 -m bench.gpu_fidelity --layers 8 --out "$OUT/fidelity.json" "${@:2}" 2>&1 | tee "$OUT/fidelity.log"
    bring_back_gptq_kernels
    [ "${SMOKE:-1}" = 0 ] || timeout "$(left 575)" python3 -m bench.gpu --layers 8 --batches 1,32 --new-tokens 32 \
        --baseline-max 2 --chunk-variants 512,0 --out "$OUT/smoke.json" 2>&1 | tail -40 | tee "$OUT/smoke.log"
else
    timeout "$(left 585)" python3 -m bench.gpu --out "$OUT/full.json" "${@:2}" 2>&1 | tee "$OUT/full.log"
fi
bring_back_row_kernels
bring_back_gptq_kernels
ls -la "$OUT"
echo "call took $(( $(date +%s) - START )) s"
