#!/usr/bin/env bash
# One call on the lent GPU machine (docs/benchmarks.md says how it is sent):
#   bench/gpu-call.sh fidelity   # 8-layer proxies: every kernel, both checkpoints (args: bench.gpu_fidelity's;
#                                # SMOKE=0: without the 8-layer benchmark after it)
#   bench/gpu-call.sh full       # the 80-layer benchmark with its baselines
#   bench/gpu-call.sh rowquant   # the row-layout kernels against Marlin, alone
#   bench/gpu-call.sh prefill    # a long prompt's prefill: products, dequantize, glue variants, profile
#   bench/gpu-call.sh probe      # the row kernels without torch (bench/rowquant_probe.cu): seconds to build;
#                                # "probe profile": each kernel once under Nsight Compute (ncu)
#   bench/gpu-call.sh attn-probe # the decode attention kernels without torch (bench/attention_probe.cu)
# Run from the repository's root. Expects the wheels in .whl (scripts/gpu-wheels)
# and, if a previous call brought them back, GPTQModel's compiled kernels as
# .gpu/kcache/ext.tgz.* and the project's own as .gpu/kcache/<name>.tgz
# (rowquant, attention, norm; carry both folders).
set -uo pipefail
MODE=${1:-fidelity}
START=$(date +%s)
left() { echo $(( ${1} - ($(date +%s) - START) )); }
KC=.gpu/kcache
if [ "$MODE" = attn-probe ]; then  # needs nothing but nvcc
    nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -o /tmp/attn bench/attention_probe.cu \
        > "$OUT/attn-build.log" 2>&1 || { tail -30 "$OUT/attn-build.log"; exit 1; }
    echo "built in $(( $(date +%s) - START )) s"
    timeout "$(left 580)" /tmp/attn "${@:2}" 2>&1 | tee "$OUT/attn.log"
    exit "${PIPESTATUS[0]}"
fi
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
# The project's own kernels (bot/engine/cuda_ext.py: rowquant, attention, norm), each
# carried as .gpu/kcache/<name>.tgz; a build whose stamp does not name the
# current sources is rebuilt by the engine itself.
declare -A carried_stamp
for t in $KC/*.tgz; do
    [ -e "$t" ] || continue
    name=$(basename "$t" .tgz)
    tar xzf "$t" -C /tmp/xwin-kernels && carried_stamp[$name]=$(cat "/tmp/xwin-kernels/$name/stamp" 2>/dev/null) \
        && echo "$name kernels restored"
done
bring_back_own_kernels() {  # each of the project's kernels built here (new or changed source), for the next call
    local built name
    for built in /tmp/xwin-kernels/*/; do
        name=$(basename "$built")
        if [ -f "$built/stamp" ] && [ "$(cat "$built/stamp")" != "${carried_stamp[$name]:-}" ] \
            && [ ! -f "$OUT/$name.tgz" ]; then
            tar czf "$OUT/$name.tgz" -C /tmp/xwin-kernels "$name"
        fi
    done
}
bring_back_gptq_kernels() {  # GPTQModel's JIT-built kernels (Marlin's: ~245 s to build), when none were carried
    if ! ls $KC/ext.tgz.* >/dev/null 2>&1 && [ -n "$(find /tmp/gptq-ext -name '*.so' 2>/dev/null)" ] \
        && ! ls "$OUT"/ext.tgz.* >/dev/null 2>&1; then
        (cd /tmp/gptq-ext && find . -name '*.so' -exec strip --strip-unneeded {} \; \
            && tar czf - $(find . -name '*.so')) | split -b 15m - "$OUT/ext.tgz."
    fi
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ "$MODE" != rowquant ]; then  # the project's kernels whose sources changed, built side by side
    timeout "$(left 300)" python3 -m bench.build_kernels 2>&1 | grep -v Warning | tail -20
fi
# The card's clocks, power and throttle reasons every 200 ms while the benchmark
# runs ($OUT/clocks.csv; the bench's log lines carry the time of day): whether a
# busier GPU (the lookahead) runs its steps slower.
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv -lms 200 > "$OUT/clocks.csv" 2>&1 &
CLOCKS=$!
trap 'kill $CLOCKS 2>/dev/null' EXIT
if [ "$MODE" = rowquant ]; then
    timeout "$(left 560)" python3 -m bench.gpu_rowquant --out "$OUT/rowquant.json" "${@:2}" 2>&1 | tee "$OUT/rowquant.log"
    bring_back_own_kernels
elif [ "$MODE" = prefill ]; then
    timeout "$(left 560)" python3 -m bench.gpu_prefill --out "$OUT/prefill.json" "${@:2}" 2>&1 | tee "$OUT/prefill.log"
elif [ "$MODE" = fidelity ]; then
    timeout "$(left "$([ "${SMOKE:-1}" = 0 ] && echo 575 || echo 430)")" python3 -m bench.gpu_fidelity --layers 8 --out "$OUT/fidelity.json" "${@:2}" 2>&1 | tee "$OUT/fidelity.log"
    bring_back_gptq_kernels
    [ "${SMOKE:-1}" = 0 ] || timeout "$(left 575)" python3 -m bench.gpu --layers 8 --batches 1,32 --new-tokens 32 \
        --baseline-max 2 --chunk-variants 512,0 --out "$OUT/smoke.json" 2>&1 | tail -40 | tee "$OUT/smoke.log"
else
    timeout "$(left 585)" python3 -m bench.gpu --out "$OUT/full.json" "${@:2}" 2>&1 | tee "$OUT/full.log"
fi
bring_back_own_kernels
bring_back_gptq_kernels
ls -la "$OUT"
echo "call took $(( $(date +%s) - START )) s"
