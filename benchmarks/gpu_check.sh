#!/usr/bin/env bash
# One prepared GPU check for arq (issue 5): build the CUDA extension, run the GPU tests and the
# kernel and end-to-end benchmarks, and write a summary JSON, all under $OUT, in < 8 minutes (the
# issue's limit: no step starts after 470 s; give the device call a timeout of 520 s and rerun
# only the steps that need it with ARQ_CHECK_STEPS). $OUT gets at most 8 files (the device tool
# returns no more): env.json, steps.tsv, summary.json, the benchmark JSONs (three) and
# logs.tgz (every step's log, the tests' JUnit XML and the kernel profile, re-packed after each
# step so that a run cut short still returns what it did).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        (run from anywhere; cds to the repo root)
#
# Assumes the machine's python already has torch (CUDA) and triton: it never installs torch.
# The lent GPU machines reach no package index and their image lacks gymnasium and torchao:
# fetch their wheels here first with `bash benchmarks/gpu_wheels.sh` (into .whl/, git-ignored)
# and name `.whl` in the device call's `carry`; this script installs them into /tmp/arq-site.
# Anything still missing is pip-installed if the network allows, and recorded. Every step fails soft: its exit status and duration go into
# $OUT/summary.json and the script goes on. Without a GPU, the GPU steps are recorded as
# "skipped" (this is how it is checked on a CPU-only machine). The script's own exit status is 0
# when it ran to the end; read the summary for the steps' results.
#
# Knobs: PYTHON (default python3, or .venv/bin/python when no python3 has torch), ARQ_CHECK_BUDGET_S
# (default 470: the whole run), ARQ_CHECK_SKIP_BUILD=1 (reuse an installed arq), ARQ_CHECK_STEPS (the
# test and benchmark steps to run, space-separated; default all of: tests_gpu bench_e2e_gpu_resnet110
# timeline tests_kernels bench_kernels bench_e2e_gpu_resnet20 memcheck profile ncu, run in that order; the
# end-to-end steps time the packed paths (graphed, the engine's default) against themselves without
# graphs and with the row loop, each paired with its base). Run only when named: the A/Bs bench_e2e_gpu_resnet110_div_f64 (the float64 quotient against
# the default div.rn) and bench_e2e_gpu_resnet110_generic_configs (generic launch configs against the
# H200-tuned ones), "tune", which measures the Triton launch configs on the card, and "tune_rows", the
# row loop's own).
# Step times on an H200 (2026-11-29, sessions 25 and 26, benchmarks/results/gpu-h200-2026-11-29-session2{5,6}):
# environment 17 s, build 56-67, tests_gpu 112 (38 tests; one took 87 s of it, split in five since),
# ResNet-110 112 (twelve variants; thirteen since session 27, ~120 estimated), timeline ~80-110 (estimated, not yet run; with the batch sweep), bench_kernels 46,
# profile 65 (both conv loops), ncu 26, tune_rows 32,
# tests_kernels ~95 with 16 workers (session 26, the three noise tests that ran ptxas for > 40 s on
# interpreter-sized blocks now use GPU-sized ones), ResNet-20 53, memcheck 46. That sums to more than
# the 470 s, so the order is what matters most for the issue first: the GPU tests, the ResNet-110 target,
# what says where its time goes (the call's parts, layer by layer), the other kernel tests, the op
# benchmarks, ResNet-20 and memcheck; the profile and the counters (measured in session 25) come last, and
# a step that finds no time left is recorded "no_time": rerun
# those on the warm machine at once (it is given back after 30 s idle) with ARQ_CHECK_STEPS and
# ARQ_CHECK_SKIP_BUILD=1.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-/tmp/arq-gpu-check}
WORK=${ARQ_CHECK_WORK:-/tmp/arq-gpu-work}
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK/logs"
START=$(date +%s)
BUDGET=${ARQ_CHECK_BUDGET_S:-470}
DEADLINE=$((START + BUDGET))
STEPS_FILE="$OUT/steps.tsv"
: > "$STEPS_FILE"

if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if ! "$PYTHON" -c "import torch" >/dev/null 2>&1 && [ -x "$REPO/.venv/bin/python" ]; then
        PYTHON="$REPO/.venv/bin/python"
    fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

note() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }

# record NAME STATUS SECONDS DETAIL
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$STEPS_FILE"; }

# step NAME MAX_SECONDS COMMAND...: runs COMMAND with a timeout of min(MAX, time left - 20 s),
# logs to $WORK/logs/NAME.log, records its exit status (124: timed out).
step() {
    local name=$1 max=$2
    shift 2
    local now left limit t0 rc
    now=$(date +%s)
    left=$((DEADLINE - now - 20))
    limit=$(( max < left ? max : left ))
    if [ "$left" -lt 15 ]; then
        note "$name: skipped, no time left"
        record "$name" "no_time" 0 "budget exhausted"
        return 0
    fi
    note "$name: start (limit ${limit}s)"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
    rc=$?
    record "$name" "$rc" "$(($(date +%s) - t0))" "$(tail -n 1 "$WORK/logs/$name.log" | tr '\t' ' ' | cut -c1-300)"
    note "$name: exit $rc after $(($(date +%s) - t0))s"
    tail -n 3 "$WORK/logs/$name.log" | sed 's/^/    | /'
    tar czf "$OUT/logs.tgz" -C "$WORK" . 2>/dev/null
    return 0
}

skip() { note "$1: skipped ($2)"; record "$1" "skipped" 0 "$2"; }

# wanted NAME: true unless ARQ_CHECK_STEPS (a space-separated list of step names) leaves NAME out
wanted() { [ -z "${ARQ_CHECK_STEPS:-}" ] || [[ " $ARQ_CHECK_STEPS " == *" $1 "* ]]; }
# named NAME: true when ARQ_CHECK_STEPS names NAME (the opt-in steps)
named() { [[ " ${ARQ_CHECK_STEPS:-} " == *" $1 "* ]]; }

# ----------------------------------------------------------------------------- environment
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
"$PYTHON" - > "$OUT/env.json" 2> "$WORK/logs/env.log" <<'EOF'
import json, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
except Exception as error:
    info["torch_error"] = repr(error)
try:
    import triton
    info["triton"] = triton.__version__
except Exception as error:
    info["triton_error"] = repr(error)
print(json.dumps(info))
EOF
HAS_CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
note "python=$PYTHON gpu='${GPU_NAME:-none}' torch.cuda.is_available=$HAS_CUDA"

# ----------------------------------------------------------------------------- dependencies
if ls "$REPO"/.whl/*.whl > /dev/null 2>&1; then
    # --no-deps: the wheels are only what the image lacks; never let pip touch torch
    step wheels_install 60 "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --upgrade --target /tmp/arq-site "$REPO"/.whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/arq-site"
fi
# the pip names of the modules this script and the tests need that $PYTHON cannot import
missing_packages() {
    "$PYTHON" - <<'EOF'
import importlib.util
mods = {"pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "safetensors": "safetensors", "scipy": "scipy",
        "tqdm": "tqdm", "gymnasium": "gymnasium", "matplotlib": "matplotlib", "numpy": "numpy",
        "setuptools": "setuptools", "ninja": "ninja", "torchao": "torchao"}
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
EOF
}
MISSING_BEFORE=$(missing_packages)
if [ -n "$MISSING_BEFORE" ]; then
    # shellcheck disable=SC2086
    step deps_install 60 "$PYTHON" -m pip install --quiet --disable-pip-version-check --retries 1 --timeout 10 $MISSING_BEFORE
else
    record deps_install 0 0 "nothing missing"
fi
MISSING_AFTER=$(missing_packages)
note "missing before: '${MISSING_BEFORE}', after: '${MISSING_AFTER}'"

# ----------------------------------------------------------------------------- build
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS=${MAX_JOBS:-16}
if [ "${ARQ_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    skip build "ARQ_CHECK_SKIP_BUILD=1"
elif [ "$HAS_CUDA" = 1 ]; then
    # --no-deps: never let pip touch torch
    step build 240 env ARQ_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
        "$PYTHON" -m pip install --no-build-isolation --no-deps --disable-pip-version-check -e .
    if ! "$PYTHON" -c "import torch, arq._ext as e, sys; sys.exit(0 if e.cuda_ops_available() else 1)" > /dev/null 2>&1; then
        # no nvcc / a failed CUDA build: the CPU ops at least, so the Triton paths still run
        step build_cpu_only 120 env ARQ_SKIP_CUDA=1 \
            "$PYTHON" -m pip install --no-build-isolation --no-deps --disable-pip-version-check -e .
    fi
else
    skip build "no CUDA device"
fi
OPS=$("$PYTHON" -c "import torch, arq._ext as e; print(f'cpu_ops={int(e.compiled_ops_available())} cuda_ops={int(e.cuda_ops_available())}')" 2>/dev/null || echo "arq import failed")
note "extension: $OPS"

# ----------------------------------------------------------------------------- tests and benchmarks
if [ "$HAS_CUDA" = 1 ]; then
    # a hung test costs its own two minutes, not the run (pytest-timeout is in the GPU image; the
    # longest test, test_triton_backend_matches_cpp, took 59 s alone on an H200, and compiles more now)
    PER_TEST=()
    if "$PYTHON" -c "import pytest_timeout" > /dev/null 2>&1; then PER_TEST=(--timeout=120); fi
    PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider --continue-on-collection-errors "${PER_TEST[@]}")
    # in xdist workers, so Triton compiles in parallel and a crashing test costs its worker, not the run
    XDIST=()
    if "$PYTHON" -c "import xdist" > /dev/null 2>&1; then XDIST=(-n 16); fi
    wanted tests_gpu && step tests_gpu 130 "${PYTEST[@]}" "${XDIST[@]}" --durations=10 -m gpu tests \
        --junitxml="$WORK/tests_gpu.xml"
    # e2e ARCH: one end-to-end step (and one JSON) per network, so that a slow build costs one network,
    # not both; for ResNet-110 also its fallback and the opt-in A/Bs
    e2e() {
        local arch=$1
        wanted "bench_e2e_gpu_$arch" && step "bench_e2e_gpu_$arch" 180 env ARQ_E2E_DEVICE=cuda ARQ_E2E_ARCHS=$arch \
            ARQ_E2E_ROUNDS=5 "$PYTHON" -m pytest -q -s -p no:cacheprovider benchmarks/bench_e2e.py --benchmark-only \
            --benchmark-json="$OUT/bench_e2e_gpu_$arch.json"
        if [ "$arch" = resnet110 ] && wanted "bench_e2e_gpu_$arch" \
                && [ "$(tail -n 1 "$STEPS_FILE" | cut -f2)" != 0 ]; then
            # it failed: the same without the CUDA-graph baseline, for arq's own numbers at least
            # (JSON in logs.tgz: $OUT's eight files are taken)
            step bench_e2e_gpu_resnet110_nograph 90 env ARQ_E2E_DEVICE=cuda ARQ_E2E_ARCHS=$arch ARQ_E2E_ROUNDS=5 \
                ARQ_E2E_VARIANTS=arq_fp32,arq_w8a8,arq_w8a8_nographs,arq_w4a4,arq_w4a4_nographs \
                "$PYTHON" -m pytest -q -s -p no:cacheprovider benchmarks/bench_e2e.py --benchmark-only \
                --benchmark-json="$WORK/bench_e2e_gpu_${arch}_nograph.json"
        fi
        # the opt-in A/Bs (JSON in logs.tgz), the packed paths again in their own Triton cache with
        # the FP16 CUDA-graph peer measured in the same run: the requantization's float64 quotient
        # against the default div.rn (arq_kernels._common; the same codes either way), and the
        # generic "cuda" launch configs against the H200-tuned ones (arq_kernels/configs/*.json)
        for ab in "div_f64 ARQ_TRITON_DIVISION=f64" "generic_configs ARQ_TRITON_TUNED=0"; do
            read -r ab_name ab_setting <<< "$ab"
            if [ "$arch" = resnet110 ] && named "bench_e2e_gpu_resnet110_$ab_name"; then
                step "bench_e2e_gpu_resnet110_$ab_name" 90 env "$ab_setting" \
                    TRITON_CACHE_DIR="$WORK/triton-cache-$ab_name" ARQ_E2E_DEVICE=cuda ARQ_E2E_ARCHS=$arch ARQ_E2E_ROUNDS=5 \
                    ARQ_E2E_VARIANTS=arq_w8a8,arq_w4a4,fp16_cl_cudagraphs \
                    "$PYTHON" -m pytest -q -s -p no:cacheprovider benchmarks/bench_e2e.py --benchmark-only \
                    --benchmark-json="$WORK/bench_e2e_gpu_${arch}_$ab_name.json"
            fi
        done
    }
    # ResNet-110 first: the issue's GPU target is stated for it; ResNet-20 after the kernel tests
    e2e resnet110
    # where a certify call's wall time goes (the model, the noise, the votes or the host; JSON in logs.tgz):
    # session 26 found ResNet-110's packed paths at 93-100k samples/s whatever the kernels' speed
    wanted timeline && step timeline 150 "$PYTHON" -m benchmarks.gpu_timeline "$WORK/timeline.json"
    # the rest of the kernel tests, on the GPU instead of the interpreter; the lowbit conv's tests
    # run the CPU op alone (CI runs them)
    wanted tests_kernels && step tests_kernels 140 "${PYTEST[@]}" "${XDIST[@]}" --durations=15 -m "not gpu" tests/kernels \
        --ignore=tests/kernels/test_lowbit_conv.py --junitxml="$WORK/tests_kernels.xml"
    # a test that crashed the interpreter: its native backtrace (cuda-gdb also debugs host code; the
    # image has no gdb)
    if grep -qE "Segmentation fault|Fatal Python error|crashed" "$WORK/logs/tests_kernels.log" 2>/dev/null \
            && command -v cuda-gdb > /dev/null 2>&1; then
        step crash_backtrace 60 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt -ex "info sharedlibrary arq" \
            --args "$PYTHON" -X faulthandler -m pytest -q -x -p no:cacheprovider tests/kernels/test_cpp_ops.py
    fi
    wanted bench_kernels && step bench_kernels 80 "$PYTHON" -m pytest -q -p no:cacheprovider benchmarks/bench_kernels.py \
        --benchmark-only --benchmark-group-by=group --benchmark-json="$OUT/bench_kernels.json"
    # launch configs measured on this card (opt-in: ARQ_CHECK_STEPS="tune"; JSON in logs.tgz, to
    # merge into arq_kernels/configs/*.json)
    if named tune; then
        step tune 240 "$PYTHON" -m benchmarks.bench_kernels "$WORK/tuned_configs.json" shared
    fi
    # the row loop's own launch configs (opt-in: "tune_rows"; its occupancy was 18-25 % with the shared
    # ones on the H200, session 25), to merge as rows_<bucket> entries
    if named tune_rows; then
        step tune_rows 200 "$PYTHON" -m benchmarks.bench_kernels "$WORK/tuned_rows_configs.json" rows
    fi
    e2e resnet20
    # out-of-bounds accesses in any GPU path of the end-to-end benchmark, named by kernel
    if wanted memcheck && command -v compute-sanitizer > /dev/null 2>&1; then
        step memcheck 120 compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 3 \
            "$PYTHON" -m benchmarks.gpu_memcheck resnet110
    fi
    # where the quantized path's GPU time goes, kernel by kernel (JSON in logs.tgz)
    wanted profile && step profile 90 "$PYTHON" -m benchmarks.gpu_profile "$WORK/profile_resnet110.json" resnet110
    # the packed convolution's counters, one 3x3 layer per ResNet-110 stage, both K loops and cuDNN's
    # FP16 convolution beside them (benchmarks/gpu_ncu.py; the report and its CSV in logs.tgz)
    NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
    if wanted ncu && [ -n "$NCU" ]; then
        step ncu 100 "$NCU" --profile-from-start off -f -o "$WORK/ncu_layers" --section SpeedOfLight \
            --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy \
            --section LaunchStats --section WarpStateStats --section SchedulerStats --section InstructionStats \
            "$PYTHON" -m benchmarks.gpu_ncu
        [ -f "$WORK/ncu_layers.ncu-rep" ] && step ncu_csv 30 "$NCU" -i "$WORK/ncu_layers.ncu-rep" --csv --page details
    elif wanted ncu; then
        skip ncu "no ncu on this machine"
    fi
else
    for name in tests_gpu bench_e2e_gpu_resnet110 timeline tests_kernels bench_kernels bench_e2e_gpu_resnet20 \
            memcheck profile ncu; do
        skip "$name" "no CUDA device"
    done
fi

# ----------------------------------------------------------------------------- summary
GPU_NAME="$GPU_NAME" MISSING_BEFORE="$MISSING_BEFORE" MISSING_AFTER="$MISSING_AFTER" OPS="$OPS" \
ELAPSED=$(($(date +%s) - START)) BUDGET="$BUDGET" "$PYTHON" - "$OUT" "$WORK" <<'EOF' || echo "summary: python failed" >&2
import json, os, sys
out, work = sys.argv[1], sys.argv[2]
steps = []
with open(os.path.join(out, "steps.tsv"), encoding="utf-8") as handle:
    for line in handle:
        name, status, seconds, detail = (line.rstrip("\n").split("\t") + ["", "", "", ""])[:4]
        steps.append({"step": name, "status": int(status) if status.lstrip("-").isdigit() else status,
                      "seconds": int(seconds or 0), "last_log_line": detail})
try:
    env = json.load(open(os.path.join(out, "env.json"), encoding="utf-8"))
except Exception as error:
    env = {"error": repr(error)}
summary = {
    "gpu_name": os.environ.get("GPU_NAME") or None,
    "environment": env,
    "extension": os.environ.get("OPS"),
    "missing_packages_before": os.environ.get("MISSING_BEFORE", "").split(),
    "missing_packages_after": os.environ.get("MISSING_AFTER", "").split(),
    "elapsed_s": int(os.environ.get("ELAPSED", 0)), "budget_s": int(os.environ.get("BUDGET", 0)),
    "steps": steps,
    "all_ok": all(s["status"] in (0, "skipped") for s in steps),
    "files": sorted(os.listdir(out)),
}
rows = []
for arch in ("resnet110", "resnet110_nograph", "resnet110_div_f64", "resnet110_generic_configs", "resnet20"):
    in_work = arch.endswith(("nograph", "div_f64", "generic_configs"))  # $OUT's eight files are taken
    e2e = os.path.join(work if in_work else out, f"bench_e2e_gpu_{arch}.json")
    try:  # absent, or empty when the step failed before pytest-benchmark wrote it
        benches = json.load(open(e2e, encoding="utf-8")).get("benchmarks", [])
    except (OSError, ValueError):
        continue
    for bench in benches:
        extra = bench.get("extra_info", {})
        tag = "[div_f64]" if arch.endswith("div_f64") else "[generic_configs]" if arch.endswith("generic_configs") else ""
        rows.append({"name": bench["name"] + tag,
                     "samples_per_s": extra.get("samples_per_s"),
                     "speedup_vs_locuslab": extra.get("speedup_vs_locuslab"),
                     "ratio_to_best_non_arq": extra.get("ratio_to_best_non_arq"),
                     "share_of_int8_peak": extra.get("share_of_int8_peak"),
                     "certificate_backend": extra.get("certificate_backend"),
                     "paired_ratio_to_best_non_arq": extra.get("paired_ratio_to_best_non_arq"),
                     "paired_ratio_to_base": extra.get("paired_ratio_to_base")})
summary["e2e"] = rows
json.dump(summary, open(os.path.join(out, "summary.json"), "w", encoding="utf-8"), indent=2)
print(json.dumps({k: summary[k] for k in ("gpu_name", "extension", "elapsed_s", "all_ok")}))
for s in steps:
    print(f"  {s['step']:>16}: {s['status']} ({s['seconds']} s)")
EOF
note "done; summary in $OUT/summary.json"
exit 0
