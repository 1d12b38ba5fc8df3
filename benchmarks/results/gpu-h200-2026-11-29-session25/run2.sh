export PYTHONUNBUFFERED=1 CUDA_HOME=/usr/local/cuda MAX_JOBS=16 OMP_WAIT_POLICY=PASSIVE
S=$(date +%s); t(){ echo "[$(( $(date +%s)-S ))s] $*"; }
t build; ARQ_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 timeout 150 python3 -m pip install -q --no-build-isolation --no-deps --disable-pip-version-check -e . > $OUT/build.log 2>&1; echo "build rc $?"
t probe; timeout 45 python3 -m benchmarks.gpu_nan_probe resnet110 2>&1 | tee $OUT/probe.log | grep -v Warning
t e2e; ARQ_E2E_DEVICE=cuda ARQ_E2E_ARCHS=resnet110 ARQ_E2E_ROUNDS=5 ARQ_E2E_VARIANTS=arq_fp32,arq_fp16_cl,arq_w8a8,arq_w8a8_rows,arq_w4a4,arq_w4a4_rows,fp16_cl_cudagraphs timeout 120 python3 -m pytest -q -s -p no:cacheprovider benchmarks/bench_e2e.py --benchmark-only --benchmark-json=$OUT/bench_e2e_gpu_resnet110.json > $OUT/e2e.log 2>&1; echo "e2e rc $?"; grep -E "samples/s|FAILED|passed|failed" $OUT/e2e.log
L=$(( 300 - ($(date +%s)-S) )); t "memcheck rows, limit $L"
ARQ_TRITON_CONV_LOOP=rows timeout $L compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 3 python3 -m benchmarks.gpu_memcheck resnet110 > $OUT/memcheck_rows.log 2>&1; echo "memcheck rc $?"; tail -n 12 $OUT/memcheck_rows.log
t done
