#!/usr/bin/env bash
# One GPU check for fastdiff, for a CUDA machine with torch, triton, onnx and onnxruntime but no network.
#
#     bash bench/gpu_check.sh                         # from the repository root
#     FASTDIFF_WHEELS=/path/to/wheels bash bench/gpu_check.sh
#
# 1. installs fastdiff without dependencies (editable);
# 2. installs diffusers from a local wheel folder ($FASTDIFF_WHEELS, else gpu_payload/wheels) when there is
#    one, otherwise the diffusers comparison is skipped (fastdiff bench says so in its table);
# 3. runs the GPU-only tests (pytest -m gpu) with TRITON_INTERPRET=0, so Triton kernels run on the GPU;
# 4. runs the kernel benchmarks bench/bench_group_norm.py and bench/bench_attention.py;
# 5. runs fastdiff bench on arch:dit-xl-2-256 (cfg 4) and arch:sd15-unet (cfg 7.5), fp16, dpmpp_2m x 20,
#    backends eager / triton / compile, against diffusers and torch.compile(diffusers);
# 6. prints a summary table LAST: one line per step and one per benchmark figure.
#
# Every step runs under `timeout`, capped by a global deadline so the script ends within 8 minutes.
# A failing step does not stop the script; it is recorded in the summary. Fixtures travel in the ignored
# gpu_payload/fixtures folder (FASTDIFF_FIXTURES is set to it); nothing is read from ../shared.
# bench/stage_gpu_payload.sh prepares gpu_payload/ (fixtures + offline wheels) on the development machine.
# Output goes to ${FASTDIFF_GPU_OUT:-$OUT} (or gpu_out/) : logs, JSON, plots.

set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
START=$(date +%s)
BUDGET=${FASTDIFF_GPU_BUDGET_S:-470}     # seconds for everything, summary included
DEADLINE=$((START + BUDGET))
RESULTS=${FASTDIFF_GPU_OUT:-${OUT:-$ROOT/gpu_out}}
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.tsv"
: > "$SUMMARY"
export TRITON_INTERPRET=0
export PYTHONUNBUFFERED=1
export TQDM_DISABLE=1
PY=${PYTHON:-python3}

# step NAME LIMIT_S CMD...: run CMD under timeout (capped by the deadline), log to $RESULTS/NAME.log,
# record "NAME<TAB>status<TAB>seconds" in the summary.
step() {
    local name=$1 limit=$2; shift 2
    local now left rc t0 status
    now=$(date +%s)
    left=$((DEADLINE - now - 15))
    if [ "$left" -lt 10 ]; then
        printf '%s\tskipped: out of time\t0\n' "$name" >> "$SUMMARY"
        echo "== $name: skipped (out of time)"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*"
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED rc=$rc" ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$SUMMARY"
    tail -n 15 "$RESULTS/$name.log"
    echo "== $name: $status"
}

note() { printf '%s\t%s\t0\n' "$1" "$2" >> "$SUMMARY"; echo "== $1: $2"; }

# --- 1. install ------------------------------------------------------------------------------------
step install 90 $PY -m pip install --no-deps --no-build-isolation -e .
$PY -c "
import torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE VISIBLE'
print('torch', torch.__version__, 'cuda', torch.version.cuda, name)" > "$RESULTS/device.txt" 2>&1
cat "$RESULTS/device.txt"

# --- 2. diffusers from a local wheel folder ----------------------------------------------------------
WHEELS=${FASTDIFF_WHEELS:-$ROOT/gpu_payload/wheels}
COMPARE="--compare diffusers,compile"
if $PY -c "import diffusers" > /dev/null 2>&1; then
    note diffusers "already installed: $($PY -c 'import diffusers; print(diffusers.__version__)')"
elif [ -d "$WHEELS" ]; then
    step diffusers-install 90 $PY -m pip install --no-index --find-links "$WHEELS" diffusers
    $PY -c "import diffusers" > /dev/null 2>&1 || COMPARE=""   # a failed install: no comparison rows
else
    note diffusers "skipped: no wheel folder (FASTDIFF_WHEELS or gpu_payload/wheels); no diffusers comparison"
    COMPARE=""
fi

if [ -d "$ROOT/gpu_payload/fixtures" ]; then
    export FASTDIFF_FIXTURES="$ROOT/gpu_payload/fixtures"
    note fixtures "FASTDIFF_FIXTURES=$FASTDIFF_FIXTURES"
fi

# --- 3. GPU-only tests -----------------------------------------------------------------------------
step gpu-tests 110 $PY -m pytest -q -m gpu tests -p no:cacheprovider

# --- 4. kernel benchmarks --------------------------------------------------------------------------
for b in group_norm attention; do
    if [ -f "bench/bench_$b.py" ]; then
        step "bench_$b" 30 $PY "bench/bench_$b.py" --iters 50
    else
        note "bench_$b" "missing: bench/bench_$b.py"
    fi
done

# --- 5. end-to-end against diffusers ---------------------------------------------------------------
# Two runs per model, so a slow torch.compile cannot take the eager / triton figures down with it.
# The `fastdiff` entry point, not `python -m` from the repo root: the root's kernels/ folder would shadow
# the `kernels` package transformers probes, and `import diffusers` would fail.
bench_model() {  # NAME ARCH CFG
    local name=$1 arch=$2 cfg=$3
    local cmp_fast="" cmp_comp=""
    if [ -n "$COMPARE" ]; then cmp_fast="--compare diffusers"; cmp_comp="--compare diffusers,compile"; fi
    step "$name-eager-triton" 75 $PY -m fastdiff.cli bench "$arch" --backends eager,triton --batch 1 --steps 20 \
        --sampler dpmpp_2m --cfg "$cfg" --dtype fp16 --warmup 2 --repeat 5 $cmp_fast \
        --json "$RESULTS/$name-eager-triton.json"
    step "$name-compile" 120 $PY -m fastdiff.cli bench "$arch" --backends compile --batch 1 --steps 20 \
        --sampler dpmpp_2m --cfg "$cfg" --dtype fp16 --warmup 2 --repeat 5 $cmp_comp \
        --json "$RESULTS/$name-compile.json"
}
bench_model dit-xl-2-256 arch:dit-xl-2-256 4
bench_model sd15-unet arch:sd15-unet 7.5

# --- 6. summary (last) -----------------------------------------------------------------------------
$PY - "$SUMMARY" "$RESULTS" "$START" <<'EOF'
import glob, json, os, sys, time
summary, results, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
print()
print("=" * 100)
print(f"fastdiff GPU check summary ({time.time() - start:.0f}s total)")
try:
    print(open(os.path.join(results, "device.txt")).read().strip())
except OSError:
    pass
print(f"{'step':28s} {'status':40s} {'s':>5s}")
failed = 0
for line in open(summary):
    name, status, secs = (line.rstrip("\n").split("\t") + ["", ""])[:3]
    failed += not (status == "ok" or status.startswith(("skipped", "already", "missing", "FASTDIFF")))
    print(f"{name:28s} {status[:40]:40s} {secs:>5s}")
print(f"{'figure':52s} {'median ms':>10s} {'ms/step':>8s} {'img/s':>7s} {'peak MiB':>9s} {'1st +s':>7s} {'/diffusers':>10s}")
for path in sorted(glob.glob(os.path.join(results, "*.json"))):
    try:
        d = json.load(open(path))
    except Exception as e:
        print(f"{os.path.basename(path):52s} unreadable: {e}")
        continue
    if not isinstance(d, dict) or "settings" not in d:  # not a fastdiff bench file
        continue
    model = str(d["settings"].get("model", "?")).replace("arch:", "")
    ratios = {(r["backend"], r["batch"], r["vs"]): r["ratio"] for r in d.get("ratios", [])}
    for r in d.get("results", []) + d.get("compare", []):
        name = r.get("backend") or r.get("impl")
        label = f"{model} {name} b{r['batch']}"
        if r.get("status") != "ok":
            print(f"{label:52s} {r.get('status')}: {str(r.get('reason', ''))[:60]}")
            continue
        rat = ratios.get((name, r["batch"], "diffusers"))
        mem = r.get("peak_memory_bytes")
        print(f"{label:52s} {r['median_s'] * 1e3:10.1f} {r['per_step_s'] * 1e3:8.2f} {r['images_per_s']:7.2f} "
              f"{(mem or 0) / 2**20:9.0f} {r['warmup_overhead_s']:7.2f} {('%.2f' % rat) if rat else '-':>10s}")
print(f"{failed} step(s) failed or timed out; logs and JSON in {results}")
EOF
