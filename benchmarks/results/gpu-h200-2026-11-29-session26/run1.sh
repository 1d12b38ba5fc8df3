# Session 26's device call (an H200): gpu_check.sh's GPU tests, the ResNet-110 end-to-end step and the
# row loop's tuning, then the tuned rows_<bucket> entries merged into this copy's packed_conv.json and
# the graphed packed paths timed again with and without the row loop. $OUT: gpu_check's files plus
# tuned_rows_configs.json, bench_e2e_rows_tuned.json, run1-console.log (8 at most).
export PYTHONUNBUFFERED=1 CUDA_HOME=/usr/local/cuda MAX_JOBS=16 OMP_WAIT_POLICY=PASSIVE
S=$(date +%s); t(){ echo "[$(( $(date +%s)-S ))s] $*"; }
ARQ_CHECK_BUDGET_S=${BUDGET:-500} ARQ_CHECK_STEPS="tests_gpu bench_e2e_gpu_resnet110 tune_rows" bash benchmarks/gpu_check.sh
TUNED=/tmp/arq-gpu-work/tuned_rows_configs.json
if [ -s "$TUNED" ]; then
    cp "$TUNED" "$OUT/tuned_rows_configs.json"
    python3 - "$TUNED" <<'PY'
import json, sys
tuned = json.load(open(sys.argv[1]))["packed_conv"]
path = "arq_kernels/configs/packed_conv.json"
table = json.load(open(path))
for device, buckets in tuned.items():
    for bucket, cfg in buckets.items():
        table.setdefault(device, {})[bucket] = {k: v for k, v in cfg.items() if k != "measured_us"}
        print("merged", device, bucket, table[device][bucket], cfg.get("measured_us"), "us")
json.dump(table, open(path, "w"), indent=1)
PY
    L=$(( ${TOTAL:-585} - ($(date +%s)-S) )); t "e2e with the tuned row configs, limit $L"
    if [ "$L" -gt 40 ]; then
        ARQ_E2E_DEVICE=cuda ARQ_E2E_ARCHS=resnet110 ARQ_E2E_ROUNDS=5 \
            ARQ_E2E_VARIANTS=arq_w8a8_graphs,arq_w8a8_graphs_rows,arq_w4a4_graphs,arq_w4a4_graphs_rows,fp16_cl_cudagraphs \
            timeout "$L" python3 -m pytest -q -s -p no:cacheprovider benchmarks/bench_e2e.py --benchmark-only \
            --benchmark-json="$OUT/bench_e2e_rows_tuned.json" > /tmp/arq-gpu-work/logs/e2e_rows_tuned.log 2>&1
        echo "e2e rc $?"; grep -E "samples/s|FAILED|passed|failed|paired" /tmp/arq-gpu-work/logs/e2e_rows_tuned.log | tail -20
        tar czf "$OUT/logs.tgz" -C /tmp/arq-gpu-work . 2>/dev/null
    fi
fi
t done
