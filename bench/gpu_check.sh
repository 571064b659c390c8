#!/usr/bin/env bash
# One GPU check for fastdiff, for a CUDA machine with torch, triton, onnx and onnxruntime but no network.
#
#     bash bench/gpu_check.sh                                   # from the repository root: every stage
#     FASTDIFF_GPU_STAGES="sd15-compile cuda-ext" bash bench/gpu_check.sh   # chosen stages only
#     FASTDIFF_WHEELS=/path/to/wheels bash bench/gpu_check.sh
#     FASTDIFF_GPU_DIT=arch:tiny-dit FASTDIFF_GPU_SD=arch:tiny-sd-unet FASTDIFF_GPU_SKIP_INSTALL=1 bash bench/gpu_check.sh
#                        # a CPU smoke run of the script itself (tests/test_gpu_check_script.py)
#
# Stages, in this order (FASTDIFF_GPU_STAGES picks a subset; install always runs):
#   cuda-ext      build csrc/ (nvcc, sm_90) in the background; after the kernel benches: its GPU test and
#                 the GroupNorm and sampler-update benches with it
#   tests         pytest -m gpu with TRITON_INTERPRET=0 (kernels at model shapes, triton backend, CUDA-graph
#                 step / loop replay vs eager, no recapture, compile + graphs)
#   kernels       bench/bench_group_norm.py, bench_attention.py, bench_adaln.py, bench_sampler_update.py,
#                 bench_geglu.py (device time inside graphs)
#   gn-sweep      bench/bench_group_norm.py --sweep: strategy x splits x tile x warps at 2x320x64x64 (defaults)
#   attn-split    bench/check_attention_tiles.py (every attention tile x head dim x split mode, each alone in a
#                 process, against SDPA), then bench_attention.py --split (the forced head-dim split, timed)
#   launch        bench/bench_graph_launch.py: host cost of replaying graphs of SDPA (per backend) / Triton
#   profile       bench/profile_network.py: one DiT-XL/2 and one SD1.5 network call's device time per kernel
#                 family (GEMM, convolution, attention, GroupNorm, ...), with fastdiff's GPU defaults, and SD1.5's
#                 again with its attention on Triton
#   dit           fastdiff bench arch:dit-xl-2-256, fp16, dpmpp_2m x 20, cfg 4: eager / triton / CUDA-graph
#                 variants vs diffusers eager (DiTTransformer2DModel + DPMSolverMultistepScheduler)
#   dit-new       DiT variants with every op on Triton and with per-layer tuning, beside triton+loop, in a process of
#                 their own (the TMA attention and the one-pass residual + norm ran there in run 4; now defaults)
#   sd15          the same for arch:sd15-unet (64x64 latents, 77 text tokens, cfg 7.5), channels-last
#   sd15-new      SD1.5's defaults since run 6 (every op on Triton) beside run 5's (+sdpa+noresln+noupd), the TMA
#                 attention, SDPA's, torch's update and per-layer tuning, in a process of their own
#   sd15-cudnn    SD1.5 triton+loop+cl with and without cudnn_benchmark, each in a process of its own
#   dit-vs-compile / sd15-vs-compile   fastdiff triton+loop, diffusers eager and
#                 torch.compile(diffusers model, mode="max-autotune"), in one run
#   sd15-vs-compile-ro   the same with mode="reduce-overhead" (no autotuning)
#   sd15-inductor-tune   bench/inductor_pretune.py: only torch.compile(diffusers SD1.5 UNet, "max-autotune") with
#                 sd15-vs-compile's flags, called once: its autotuning, with none of fastdiff's rows first (the
#                 timed stage after it finds the timings in Inductor's cache)
#   dit-autotune / sd15-autotune   fastdiff compile+loop+autotune (Inductor's autotuned GEMMs under
#                 fastdiff's loop graph) vs diffusers eager
#   dit-compile   fastdiff's compile backend (+ loop graphs) vs diffusers eager
#   sd15-compile  the same for the SD1.5 UNet
#   sd15-controlnet  SD1.5 driven by a ControlNet (--controlnet random): eager / triton+loop vs diffusers eager with
#                 the same ControlNet
#   sdxl          arch:sdxl-unet (SDXL base, 128x128 latents = 1024x1024, 77 text tokens, pooled text and
#                 default ids, cfg 5): eager / triton+loop, channels-last, vs diffusers eager (last: least urgent)
#   sd3           arch:sd3-medium (SD3 Medium's MMDiT, 128x128 latents, 333 text tokens, pooled text, cfg 5,
#                 dpmpp_2m's flow variant): eager / triton+loop vs diffusers eager
#   flux          arch:flux-dev (FLUX.1 dev, 12 B parameters, 128x128 latents, 512 T5 tokens, guidance 3.5, no
#                 CFG, FluxPipeline's Euler grid): eager / triton+loop vs diffusers eager
# A summary table prints LAST: one line per step, one per end-to-end figure, and the kernel tables.
#
# Every step runs under `timeout`, capped by a global deadline (FASTDIFF_GPU_BUDGET_S, default 480 s).
# A failing step does not stop the script; it is recorded in the summary. Fixtures travel in the ignored
# gpu_payload/fixtures folder (FASTDIFF_FIXTURES is set to it); nothing is read from ../shared.
# bench/stage_gpu_payload.sh prepares gpu_payload/ (fixtures + offline wheels) on the development machine.
# Logs and JSON go to a work folder; with $OUT set (the device tool) they come back as one
# $OUT/gpu_results.tgz plus $OUT/summary.txt (the tool returns at most 8 files).

set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
START=$(date +%s)
BUDGET=${FASTDIFF_GPU_BUDGET_S:-480}     # seconds for everything, summary included
DEADLINE=$((START + BUDGET))
STAGES=" ${FASTDIFF_GPU_STAGES:-cuda-ext tests kernels gn-sweep attn-split launch profile dit dit-new sd15 sd15-new sd15-cudnn dit-vs-compile dit-autotune sd15-inductor-tune sd15-vs-compile sd15-vs-compile-ro sd15-autotune dit-compile sd15-compile sd15-controlnet sdxl sd3 flux} "
RESULTS=${FASTDIFF_GPU_OUT:-$ROOT/gpu_out}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)   # absolute: the bench steps run from /tmp
wants() { case "$STAGES" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
SUMMARY="$RESULTS/summary.tsv"
: > "$SUMMARY"
export TRITON_INTERPRET=0
export PYTHONUNBUFFERED=1
export TQDM_DISABLE=1
PY=${PYTHON:-python3}
# Inductor's cache in the work folder, seeded with the tuning results earlier runs brought back
# (bench/gpu_runs/inductor_autotune/, see bench/inductor_autotune.py): max-autotune of the diffusers SD1.5 UNet
# outlived a 354 s step in run 4 (5-42 s per GEMM / convolution problem), so each run continues where the last
# one stopped. Only those results come back (the choices' timings and the kernels' chosen configs: two JSON
# bundles, whatever the number of software stacks), not the compiled kernels.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$RESULTS/inductor}
"$PY" "$ROOT/bench/inductor_autotune.py" seed "${FASTDIFF_GPU_AUTOTUNE_SEED:-bench/gpu_runs/inductor_autotune}" \
    "$TORCHINDUCTOR_CACHE_DIR"

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
    publish
}

# publish: the work folder as it stands into $OUT (the device tool), after every step, so a call cut short by
# the device budget still returns every finished step's log and JSON
publish() {
    if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
        "$PY" "$ROOT/bench/inductor_autotune.py" save "$TORCHINDUCTOR_CACHE_DIR" "$RESULTS/inductor_autotune" > /dev/null 2>&1
        tar czf "$OUT/gpu_results.tgz.tmp" --exclude="$(basename "$RESULTS")/inductor" \
            --exclude="$(basename "$RESULTS")/tests-cache" \
            -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2> /dev/null &&
            mv "$OUT/gpu_results.tgz.tmp" "$OUT/gpu_results.tgz" || rm -f "$OUT/gpu_results.tgz.tmp"
        cp "$SUMMARY" "$OUT/summary.tsv" 2> /dev/null
    fi
    return 0
}

note() { printf '%s\t%s\t0\n' "$1" "$2" >> "$SUMMARY"; echo "== $1: $2"; }

# Inductor's tuning results straight into $OUT every 30 s as well: a torch.compile step can outlive the device
# budget, which cuts the call off before the step ends and publish() runs (two small files per software stack)
# (its output goes to /dev/null: holding the script's stdout open would keep a reader such as `| tail` waiting;
# it stops with the script, which `kill -0 $$` checks, and the EXIT trap ends it at once)
# (each file written then renamed, so a call cut off mid-copy brings back no torn JSON)
AUTOTUNE_WATCH_PID=""
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    ( trap 'kill "$nap" 2> /dev/null; exit 0' TERM
      while kill -0 $$ 2> /dev/null; do
          sleep "${FASTDIFF_GPU_AUTOTUNE_EVERY_S:-30}" & nap=$!; wait "$nap"
          "$PY" "$ROOT/bench/inductor_autotune.py" save "$TORCHINDUCTOR_CACHE_DIR" "$OUT/inductor_autotune"
      done ) < /dev/null > /dev/null 2>&1 &
    AUTOTUNE_WATCH_PID=$!
    trap 'kill "$AUTOTUNE_WATCH_PID" 2> /dev/null' EXIT
    trap 'exit 143' TERM INT  # so a killed script still runs its EXIT trap
fi

# --- 1. install ------------------------------------------------------------------------------------
if [ -n "${FASTDIFF_GPU_SKIP_INSTALL:-}" ]; then  # the project is importable already (the CPU smoke test)
    note install "skipped: FASTDIFF_GPU_SKIP_INSTALL"
else
    step install 90 $PY -m pip install --no-deps --no-build-isolation -e .
fi
$PY -c "
import torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE VISIBLE'
print('torch', torch.__version__, 'cuda', torch.version.cuda, name)" > "$RESULTS/device.txt" 2>&1
cat "$RESULTS/device.txt"
# versions, backends, the per-op table and the path each fused layer takes there (in the results tarball)
step info 40 env -C /tmp $PY -m fastdiff.cli info arch:tiny-sd-unet

# --- 2. diffusers from a local wheel folder ----------------------------------------------------------
WHEELS=${FASTDIFF_WHEELS:-$ROOT/gpu_payload/wheels}
COMPARE="--compare diffusers,compile"
if env -C /tmp $PY -c "import diffusers" > /dev/null 2>&1; then
    note diffusers "already installed: $($PY -c 'import diffusers; print(diffusers.__version__)')"
elif [ -d "$WHEELS" ]; then
    step diffusers-install 90 $PY -m pip install --no-index --find-links "$WHEELS" diffusers
    env -C /tmp $PY -c "import diffusers" > /dev/null 2>&1 || COMPARE=""   # a failed install: no comparison rows
else
    note diffusers "skipped: no wheel folder (FASTDIFF_WHEELS or gpu_payload/wheels); no diffusers comparison"
    COMPARE=""
fi

if [ -d "$ROOT/gpu_payload/fixtures" ]; then
    export FASTDIFF_FIXTURES="$ROOT/gpu_payload/fixtures"
    note fixtures "FASTDIFF_FIXTURES=$FASTDIFF_FIXTURES"
fi

# --- 3. the optional CUDA C++ extension builds in the background (CPU only: nvcc) while the tests and
# kernel benches run; the cuda-ext stage waits for it before the end-to-end stages, whose host timings
# it would otherwise disturb.
if wants cuda-ext; then
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-8}
    # `timeout` leads a process group of its own (python, ninja, nvcc): the kill below ends all of it
    ( t0=$(date +%s); timeout 240 $PY -m fastdiff.cuda_ext build > "$RESULTS/cuda-ext-build.log" 2>&1 &
      echo $! > "$RESULTS/cuda-ext-build.pid"; wait $!
      echo "rc=$? seconds=$(( $(date +%s) - t0 ))" >> "$RESULTS/cuda-ext-build.log" ) &
    EXT_BUILD_PID=$!
fi

# --- 4. GPU-only tests -----------------------------------------------------------------------------
# in 4 processes when pytest-xdist is there (a wheel in the payload): most of the tests' time is Triton
# compiling kernels, which runs on the CPU
XDIST=""
if wants tests; then
    if ! env -C /tmp $PY -c "import xdist" > /dev/null 2>&1 && [ -d "$WHEELS" ]; then
        step xdist-install 60 $PY -m pip install --quiet --no-index --find-links "$WHEELS" pytest-xdist
    fi
    env -C /tmp $PY -c "import xdist" > /dev/null 2>&1 && XDIST="-n 4"
    note gpu-tests-workers "ok: ${XDIST:-one process (no pytest-xdist)}"
fi
# a cache folder of their own: the extension building beside them would otherwise appear half-way through the
# run, loaded by some workers and not others (its own test runs in the cuda-ext stage)
wants tests && step gpu-tests 180 env FASTDIFF_CACHE="$RESULTS/tests-cache" \
    $PY -m pytest -q -m gpu tests -p no:cacheprovider $XDIST

# --- 5. kernel benchmarks --------------------------------------------------------------------------
if wants kernels; then
    for b in group_norm attention adaln sampler_update geglu; do
        step "bench_$b" 60 $PY "bench/bench_$b.py" --iters 50
    done
fi
wants gn-sweep && step bench_group_norm_sweep 150 $PY bench/bench_group_norm.py --sweep --iters 30
# the head-dim split of the Triton attention computed wrong results on an H200 (run 3): which tiles, and its
# speed with the tiles that were right (a separate step: a crash cannot take the plain attention rows with it)
if wants attn-split; then
    step check_attention_tiles 150 env -C /tmp $PY "$ROOT/bench/check_attention_tiles.py" --jobs 12 \
        --json "$RESULTS/attention_tiles.json"
    step bench_attention_split 60 $PY bench/bench_attention.py --split --iters 50
fi
# host cost of replaying graphs that hold SDPA (per backend) vs the Triton attention
wants launch && step bench_graph_launch 90 $PY bench/bench_graph_launch.py --calls 50,640 --between none,gemm

if wants cuda-ext; then
    now=$(date +%s); left=$((DEADLINE - now - 60))
    if [ "$left" -gt 0 ]; then timeout "$left" tail --pid="$EXT_BUILD_PID" -f /dev/null; fi
    [ -s "$RESULTS/cuda-ext-build.pid" ] && kill -- -"$(cat "$RESULTS/cuda-ext-build.pid")" 2> /dev/null
    wait "$EXT_BUILD_PID" 2> /dev/null
    if grep -q "^rc=0" "$RESULTS/cuda-ext-build.log" 2>/dev/null; then
        note cuda-ext-build "ok: $(tail -n 1 "$RESULTS/cuda-ext-build.log")"
        step cuda-ext-test 40 $PY -m pytest -q -m gpu tests/kernels/test_cuda_ext.py -p no:cacheprovider
        step bench_group_norm_ext 40 $PY bench/bench_group_norm.py --iters 50
        step bench_sampler_update_ext 30 $PY bench/bench_sampler_update.py --iters 50
    else
        note cuda-ext-build "FAILED or unfinished: $(tail -n 2 "$RESULTS/cuda-ext-build.log" 2>/dev/null | tr '\n' ' ' | cut -c1-200)"
    fi
fi

# --- where a network call's time goes (device time per kernel family, graphs off) --------------------------
if wants profile; then
    step profile_dit 90 $PY bench/profile_network.py "${FASTDIFF_GPU_DIT:-arch:dit-xl-2-256}" --json "$RESULTS/profile_dit.json"
    step profile_sd15 120 $PY bench/profile_network.py "${FASTDIFF_GPU_SD:-arch:sd15-unet}" --json "$RESULTS/profile_sd15.json"
    # the same with the attention on SDPA (cuDNN on Hopper) instead of the UNet's default Triton pointer kernel
    # (since run 6: cuDNN's graph nodes cost SD1.5 2.4 ms of launch per step): the device time that choice gives up
    step profile_sd15_sdpa 120 $PY bench/profile_network.py "${FASTDIFF_GPU_SD:-arch:sd15-unet}" --switches sdpa \
        --json "$RESULTS/profile_sd15_sdpa.json"
fi

# --- 6. end-to-end against diffusers ---------------------------------------------------------------
# One process per model, so fastdiff, diffusers eager and torch.compile(diffusers, mode="max-autotune")
# are compared in the same run. Run from /tmp: with the repository root as the working directory,
# `python -m` puts it on sys.path and its kernels/ folder shadows the `kernels` package that transformers
# (imported by diffusers) probes for.
bench_e2e() {  # NAME ARCH CFG LIMIT BACKENDS COMPARE [EXTRA FLAGS]
    local name=$1 arch=$2 cfg=$3 limit=$4 backends=$5 compare=$6 extra=${7:-}
    [ -n "$COMPARE" ] || compare=""
    # shellcheck disable=SC2086  # (EXTRA is a list of flags)
    step "$name" "$limit" env -C /tmp $PY -m fastdiff.cli bench "$arch" --backends "$backends" --batch 1 --steps 20 \
        --sampler dpmpp_2m --cfg "$cfg" --dtype fp16 --warmup 2 --repeat 10 ${compare:+--compare $compare} $extra \
        ${FASTDIFF_COMPILE_MODE:+--compile-mode $FASTDIFF_COMPILE_MODE} \
        --json "$RESULTS/$name.json"
}
DIT=${FASTDIFF_GPU_DIT:-arch:dit-xl-2-256}   # overridable for a CPU smoke run of this script (arch:tiny-dit)
SD=${FASTDIFF_GPU_SD:-arch:sd15-unet}
# fastdiff's variants against diffusers eager; "triton" takes the measured per-op table, "+allk" every op
# on its Triton kernel, "+flash" SDPA pinned to FlashAttention (torch 2.11 on Hopper prefers cuDNN, whose
# graphs replayed with a high host cost in the 2026-11-26 run)
# (FASTDIFF_GPU_DIT_VARIANTS / FASTDIFF_GPU_SD_VARIANTS replace the lists: an SD1.5 variant costs ~15-25 s)
# Since run 4 a DiT's defaults on CUDA include precompute_adaln, the one-pass residual + norm and the TMA attention;
# +noprecompute / +pair / +sdpa take each back, and all three together are run 4's baseline
wants dit && bench_e2e dit-xl-2-256 "$DIT" 4 150 \
    "${FASTDIFF_GPU_DIT_VARIANTS:-eager,eager+loop,triton+step,triton+loop,triton+loop+noprecompute,triton+loop+pair,triton+loop+sdpa,triton+loop+noprecompute+pair+sdpa,triton+loop+upd}" diffusers
# Variants with kernels new to that model on a GPU, in a process of their own with the baseline beside them: in run 3a one kernel's illegal memory access took every later row of its process with it,
# diffusers' included (FASTDIFF_GPU_DIT_NEW_VARIANTS / FASTDIFF_GPU_SD_NEW_VARIANTS replace the lists)
wants dit-new && bench_e2e dit-xl-2-256-new "$DIT" 4 150 \
    "${FASTDIFF_GPU_DIT_NEW_VARIANTS:-triton+loop,triton+loop+allk,triton+loop+tune}" ""
wants sd15 && bench_e2e sd15-unet "$SD" 7.5 300 \
    "${FASTDIFF_GPU_SD_VARIANTS:-eager+cl,eager+loop+cl,triton+step+cl,triton+loop+cl,triton+loop+cl+nocond,triton+loop+cl+noconvbias,triton+loop+cl+noupd}" diffusers
wants sd15-new && bench_e2e sd15-unet-new "$SD" 7.5 240 \
    "${FASTDIFF_GPU_SD_NEW_VARIANTS:-triton+loop+cl,triton+loop+cl+sdpa+noresln+noupd,triton+loop+cl+tma,triton+loop+cl+sdpa,triton+loop+cl+noupd,triton+loop+cl+tune}" ""
# cudnn_benchmark against the same variant without it, each in a process of its own: cuDNN's plan cache ignores
# the benchmark flag, so in one process whichever ran first would choose the convolutions' plans for both
wants sd15-cudnn && bench_e2e sd15-unet-cudnn-off "$SD" 7.5 120 triton+loop+cl ""
wants sd15-cudnn && bench_e2e sd15-unet-cudnn-on "$SD" 7.5 120 triton+loop+cl+cudnnbench ""
# the best fastdiff variant, diffusers eager and torch.compile(diffusers, mode="max-autotune") in one run
# (a process of its own: a compile that outlives its limit cannot take the figures above with it)
# Inductor's max-autotune of the diffusers DiT ran past 176 s on an H200 (one GEMM's autotuning took 37 s):
# these stages need a call of their own (FASTDIFF_GPU_STAGES=dit-vs-compile, FASTDIFF_GPU_BUDGET_S=540)
# Each row is logged as soon as it is measured: a step cut off by its limit keeps the rows before the cut in
# its .log.
wants dit-vs-compile && bench_e2e dit-xl-2-256-vs-compile "$DIT" 4 480 \
    "${FASTDIFF_GPU_DIT_COMPILE_VARIANTS:-triton+loop}" diffusers,compile
# Inductor's autotuning of that UNet alone, before the timed stage (it outlived three calls' timed stages, which
# spent their first 100 s on fastdiff's rows): the same flags as bench_e2e's, so the timed stage's compile finds
# every problem timed in the cache folder. Its first-call seconds are not a figure.
if wants sd15-inductor-tune; then
    if [ -n "$COMPARE" ]; then
        step sd15-unet-inductor-tune 560 env -C /tmp $PY "$ROOT/bench/inductor_pretune.py" "$SD" --batch 1 --steps 20 \
            --sampler dpmpp_2m --cfg 7.5 --dtype fp16 ${FASTDIFF_COMPILE_MODE:+--compile-mode $FASTDIFF_COMPILE_MODE}
    else
        note sd15-unet-inductor-tune "skipped: no diffusers (it compiles diffusers' UNet)"
    fi
fi
wants sd15-vs-compile && bench_e2e sd15-unet-vs-compile "$SD" 7.5 520 \
    "${FASTDIFF_GPU_SD_COMPILE_VARIANTS:-triton+loop+cl}" diffusers,compile
# the same against torch.compile(mode="reduce-overhead"): no autotuning, about 150 s on an H200 (run 6b)
if wants sd15-vs-compile-ro; then
    if [ -n "$COMPARE" ]; then
        bench_e2e sd15-unet-vs-compile-ro "$SD" 7.5 240 "${FASTDIFF_GPU_SD_COMPILE_VARIANTS:-triton+loop+cl}" \
            diffusers,compile "--compile-mode reduce-overhead"
    else
        note sd15-unet-vs-compile-ro "skipped: no diffusers (it compiles diffusers' UNet)"
    fi
fi
# fastdiff's compile backend with Inductor's GEMM autotuning under its own loop graph: the same GEMM kernels as
# the compiled diffusers model, so next to the stage above it shows what the captured loop adds. After the
# -vs-compile stage, Inductor's on-disk autotuning cache already holds the GEMM shapes the two models share.
wants dit-autotune && bench_e2e dit-xl-2-256-autotune "$DIT" 4 300 compile+loop+autotune diffusers
wants sd15-autotune && bench_e2e sd15-unet-autotune "$SD" 7.5 400 compile+loop+cl+autotune diffusers
# fastdiff's own torch.compile backend (Inductor on the native ops, plus fastdiff's CUDA graphs)
wants dit-compile && bench_e2e dit-xl-2-256-compile "$DIT" 4 150 compile+loop diffusers
wants sd15-compile && bench_e2e sd15-unet-compile "$SD" 7.5 200 compile+loop+cl diffusers
# SD1.5 driven by a ControlNet (ControlNet.from_unet of the UNet, random outputs): fastdiff captures both networks in
# one loop graph; diffusers eager runs StableDiffusionControlNetPipeline's two calls per step
wants sd15-controlnet && bench_e2e sd15-unet-controlnet "$SD" 7.5 200 \
    "${FASTDIFF_GPU_SD_CONTROLNET_VARIANTS:-eager+cl,triton+loop+cl}" diffusers "--controlnet random"
# SDXL base (2.6 B parameters, 5 GB in fp16; SDXL's 10-deep transformers at 32x32 tokens)
SDXL=${FASTDIFF_GPU_SDXL:-arch:sdxl-unet}
wants sdxl && bench_e2e sdxl-unet "$SDXL" 5 240 "${FASTDIFF_GPU_SDXL_VARIANTS:-eager+cl,triton+loop+cl}" diffusers
# SD3 Medium's MMDiT (2.0 B parameters; 4096 image + 77 text tokens attend jointly in each of 24 blocks)
SD3=${FASTDIFF_GPU_SD3:-arch:sd3-medium}
wants sd3 && bench_e2e sd3-medium "$SD3" 5 240 "${FASTDIFF_GPU_SD3_VARIANTS:-eager,triton+loop}" diffusers
# FLUX.1 dev (24 GB of fp16 weights per copy: fastdiff's and diffusers' fit an H100 together; cfg 1: dev's guidance
# is an input). The bench's sampler is dpmpp_2m; for Flux its diffusers side runs FluxPipeline's FlowMatchEuler.
FLUX=${FASTDIFF_GPU_FLUX:-arch:flux-dev}
wants flux && bench_e2e flux-dev "$FLUX" 1 300 "${FASTDIFF_GPU_FLUX_VARIANTS:-eager,triton+loop}" diffusers

# --- 6. summary (last) -----------------------------------------------------------------------------
$PY - "$SUMMARY" "$RESULTS" "$START" <<'EOF' | tee "$RESULTS/summary.txt"
import glob, json, os, sys, time
summary, results, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
print()
print("=" * 110)
print(f"fastdiff GPU check summary ({time.time() - start:.0f}s total)")
try:
    print(open(os.path.join(results, "device.txt")).read().strip())
except OSError:
    pass
# kernel tables: each bench log's table as printed
for name in ("bench_group_norm", "bench_attention", "check_attention_tiles", "bench_attention_split", "bench_adaln",
             "bench_sampler_update", "bench_geglu", "bench_group_norm_ext", "bench_sampler_update_ext",
             "bench_group_norm_sweep", "bench_graph_launch", "profile_dit", "profile_sd15", "profile_sd15_tattn"):
    try:
        lines = open(os.path.join(results, name + ".log")).read().strip().splitlines()
    except OSError:
        continue
    print(f"-- {name}")
    # the table, not Python's library warnings (the benches' own "warning:" lines stay)
    noise = ("UserWarning", "FutureWarning", "DeprecationWarning", "  warn", "  warnings.warn")
    print("\n".join([l for l in lines if not l.startswith("device:") and not any(n in l for n in noise)][-50:]))
print(f"{'step':28s} {'status':40s} {'s':>5s}")
failed = 0
for line in open(summary):
    name, status, secs = (line.rstrip("\n").split("\t") + ["", ""])[:3]
    failed += not (status.startswith(("ok", "skipped", "already", "missing", "FASTDIFF")))
    print(f"{name:28s} {status[:40]:40s} {secs:>5s}")
print(f"{'figure (batch 1, 20 steps, fp16)':40s} {'median ms':>9s} {'p90 ms':>7s} {'steps/s':>7s} {'host us/st':>10s} "
      f"{'replay us/st':>12s} {'peak MiB':>8s} {'1st +s':>6s} {'/diff':>6s} {'/diff+c':>7s}")
for path in sorted(glob.glob(os.path.join(results, "*.json"))):
    try:
        d = json.load(open(path))
    except Exception as e:
        print(f"{os.path.basename(path):40s} unreadable: {e}")
        continue
    if not isinstance(d, dict) or "settings" not in d:  # not a fastdiff bench file
        continue
    model = str(d["settings"].get("model", "?")).replace("arch:", "")
    cut = "" if d.get("complete", True) else "; CUT OFF: the rows measured before the step's limit"
    print(f"[{os.path.splitext(os.path.basename(path))[0]}: one process, compare rows within it{cut}]")
    ratios = {(r["backend"], r["batch"], r["vs"]): r["ratio"] for r in d.get("ratios", [])}
    for r in d.get("results", []) + d.get("compare", []):
        name = r.get("backend") or r.get("impl")
        label = f"{model} {name}"
        if r.get("status") != "ok":
            print(f"{label:40s} {r.get('status')}: {str(r.get('reason', ''))[:120]}")
            continue
        rat = [ratios.get((name, r["batch"], v)) for v in ("diffusers", "diffusers+compile")]
        host, replay = r.get("host_per_step_s"), r.get("replay_host_per_step_s")
        print(f"{label:40s} {r['median_s'] * 1e3:9.1f} {r['p90_s'] * 1e3:7.1f} {1 / r['per_step_s']:7.1f} "
              f"{(host or 0) * 1e6:10.0f} {('%.1f' % (replay * 1e6)) if replay else '-':>12s} "
              f"{(r.get('peak_memory_bytes') or 0) / 2**20:8.0f} "
              f"{r['warmup_overhead_s']:6.1f} {('%.2f' % rat[0]) if rat[0] else '-':>6s} "
              f"{('%.2f' % rat[1]) if rat[1] else '-':>7s}")
        if "tune" in name and r.get("kernels"):  # what the per-layer measurement chose
            print(f"{'':40s} kernels: {r['kernels']}")
print(f"{failed} step(s) failed or timed out; logs and JSON in {results}")
EOF
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then  # the device tool: one tarball back (it returns at most 8 files)
    publish
    cp "$RESULTS/summary.txt" "$OUT/"
fi
