#!/usr/bin/env bash
# The one command for the H200 box (torch 2.11 + triton 3.6, python3.12, no package registry):
#
#     bash scripts/gpu_run.sh "$OUT" [extra `fusion-pass bench` options]
#
# with `.whl` in the device call's carry (git-ignored: hy3dgen, diffusers, peft, importlib_metadata wheels). Stages, each
# time-boxed so that the whole run ends inside 9.5 minutes:
#   tests  python3 -m pytest -q -m gpu tests            -> $OUT/gpu_tests.txt
#   ops    python3 benchmarks/ops_bench.py               -> $OUT/ops_bench.json, $OUT/ops_bench.md
#   setup  python3 benchmarks/setup_profile.py (3 runs) -> setup_profile.md
#   flux   python3 benchmarks/flux_bench.py              -> flux_bench.json, flux_bench.md
#   shapevae python3 benchmarks/shapevae_bench.py        -> shapevae_bench.json, shapevae_bench.md
#   gaps   python3 benchmarks/gap_profile.py             -> gap_profile.json, gap_profile.md
#   gemm   python3 benchmarks/gemm_probe.py              -> gemm_probe.json, gemm_probe.md
#   compile python3 benchmarks/compile_parallel_probe.py and kernel_compile_times.py, 16 workers (the
#          host's CPU only: threads vs processes at 16 cores) -> compile_parallel_probe.*, kernel_compile_times.*
#   bench  python3 -m fusion_pass.cli bench --out $OUT   -> bench.json, bench.md, bench.png,
#                                                           profile_eager.txt, profile_optimize.txt
# At most 8 files come back from $OUT: past 8, everything is packed into $OUT/run.tgz at the end. The bench gets the
# time the first two stages left (--time-budget) and drops its most expendable compile modes to
# fit; for the whole default bench alone: GPU_RUN_STAGES=bench bash scripts/gpu_run.sh "$OUT".
# Environment: GPU_RUN_STAGES (default tests,ops,bench), GPU_RUN_DEADLINE (seconds, default 560),
# GPU_RUN_FLUX_ARGS (extra options of benchmarks/flux_bench.py, e.g. "--profile").
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:?usage: bash scripts/gpu_run.sh OUT_DIR [bench options...]}
shift
mkdir -p "$OUT"
STAGES=${GPU_RUN_STAGES:-tests,ops,bench}
DEADLINE=${GPU_RUN_DEADLINE:-560}
TESTS_MAX=260
OPS_MAX=120
export PYTHONUNBUFFERED=1
SUMMARY=()

has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }
left() { echo $((DEADLINE - SECONDS)); }
box() {  # box SECONDS: the smaller of SECONDS and the time left before the deadline (>= 1:
  local l; l=$(left)   # `timeout 0` would mean no limit at all)
  (( l < 1 )) && l=1
  (( $1 < l )) && echo "$1" || echo "$l"
}
banner() { echo; echo "=== $* (t=${SECONDS}s, $(left)s left) ==="; }

# --- set-up: the carried wheels (hy3dgen: the official DiT file; diffusers, peft and
# importlib_metadata for the diffusers tests and benchmarks), installed without their deps -----
SITE=/tmp/site
WHEELS=$(ls .whl/*.whl 2>/dev/null)
if [[ -n "$WHEELS" ]]; then
  python3 -m pip install -q --no-deps --no-index --no-compile --disable-pip-version-check \
      --target "$SITE" $WHEELS 2>/dev/null || echo "warning: could not install $WHEELS"
  export PYTHONPATH=".:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "warning: no .whl/*.whl (carry .whl): the bench measures reference_models' twin, diffusers tests skip"
  export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
fi

banner "machine"
nvidia-smi || echo "warning: nvidia-smi failed"
python3 - <<'EOF'
import platform, torch
try:
    import triton; tv = triton.__version__
except Exception as exc:
    tv = f"missing ({exc})"
try:
    from reference_models import official_file; hy = official_file()
except Exception as exc:
    hy = f"missing ({exc})"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}")
print(f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE'}; hy3dgen DiT: {hy}")
EOF

# --- stage 1: GPU tests ----------------------------------------------------------------------
if has_stage tests; then
  banner "tests: pytest -m gpu"
  start=$SECONDS
  timeout -k 10 "$(box $TESTS_MAX)" python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu_tests.txt"
  rc=$?
  (( rc == 124 )) && echo "gpu tests stopped at their time box" | tee -a "$OUT/gpu_tests.txt"
  SUMMARY+=("tests rc=$rc ($((SECONDS - start)) s)")
fi

# --- stage 2: kernel micro-benchmarks ---------------------------------------------------------
if has_stage ops; then
  banner "ops: benchmarks/ops_bench.py"
  start=$SECONDS
  if [[ -f benchmarks/ops_bench.py ]]; then
    OPS_OUT=$(mktemp -d /tmp/ops_bench.XXXXXX)  # only its two files are copied into $OUT
    timeout -k 10 "$(box $OPS_MAX)" python3 benchmarks/ops_bench.py --out "$OPS_OUT" 2>&1
    rc=$?
    for f in ops_bench.json ops_bench.md; do
      [[ -f "$OPS_OUT/$f" ]] && cp "$OPS_OUT/$f" "$OUT/$f"
    done
    SUMMARY+=("ops rc=$rc ($((SECONDS - start)) s)")
  else
    echo "benchmarks/ops_bench.py does not exist yet: skipped"
    SUMMARY+=("ops absent")
  fi
fi

# --- stage setup: cold set-up (empty Triton cache, fresh process) with and without the first
# call's parallel precompile; one file, setup_profile.md ------------------------------------
if has_stage setup; then
  banner "setup: benchmarks/setup_profile.py (precompile on; on after two eager calls; off)"
  start=$SECONDS
  SETUP_OUT=$(mktemp -d /tmp/setup_profile.XXXXXX)
  for flag in "" "--eager-first" "--no-precompile"; do
    timeout -k 10 "$(box 150)" python3 benchmarks/setup_profile.py --out "$SETUP_OUT/run${flag}" $flag 2>&1 | tail -16
    cat "$SETUP_OUT/run${flag}/setup_profile.md" >> "$OUT/setup_profile.md" 2>/dev/null
  done
  SUMMARY+=("setup ($((SECONDS - start)) s)")
fi

# --- stages flux, shapevae: the other models' side-by-side benchmarks (two files each) --------
for stage in flux shapevae; do
  if has_stage $stage; then
    banner "$stage: benchmarks/${stage}_bench.py"
    start=$SECONDS
    extra=(); [[ $stage == flux ]] && read -ra extra <<< "${GPU_RUN_FLUX_ARGS:-}"
    timeout -k 10 "$(box 300)" python3 benchmarks/${stage}_bench.py --out "$OUT" "${extra[@]}" 2>&1 | grep -v "should be kept in float32"
    SUMMARY+=("$stage rc=${PIPESTATUS[0]} ($((SECONDS - start)) s)")
  fi
done

# --- stages gaps, gemm: the step's idle time between kernels, and the GEMM probe (two files each) --
for stage in gaps gemm; do
  if has_stage $stage; then
    script=$([[ $stage == gaps ]] && echo gap_profile || echo gemm_probe)
    banner "$stage: benchmarks/$script.py"
    start=$SECONDS
    timeout -k 10 "$(box 150)" python3 benchmarks/$script.py --out "$OUT" 2>&1 | tail -4
    SUMMARY+=("$stage rc=${PIPESTATUS[0]} ($((SECONDS - start)) s)")
  fi
done

# --- stage compile: Triton compile times on this host's CPU (no GPU use), 16 workers ------------
if has_stage compile; then
  banner "compile: benchmarks/compile_parallel_probe.py, benchmarks/kernel_compile_times.py"
  start=$SECONDS
  timeout -k 10 "$(box 90)" python3 benchmarks/compile_parallel_probe.py --out "$OUT" --n 16 --workers 16 2>&1 | tail -8
  timeout -k 10 "$(box 150)" python3 benchmarks/kernel_compile_times.py --out "$OUT" --workers 16 2>&1 | tail -12
  SUMMARY+=("compile ($((SECONDS - start)) s)")
fi

# --- stage 3: the bench (its summary tables are the last thing printed) -----------------------
if has_stage bench; then
  # python start-up and writing the files come on top of the budget the bench plans with
  budget=$(( $(left) - 30 ))
  banner "bench: --time-budget ${budget}s"
  start=$SECONDS
  if (( budget < 60 )); then
    echo "not enough time left for the bench"
    SUMMARY+=("bench skipped (no time)")
  else
    if [[ -f fusion_pass/cli.py ]] && grep -q '"bench"' fusion_pass/cli.py; then
      BENCH=(python3 -m fusion_pass.cli bench)
    else
      BENCH=(python3 -m fusion_pass.bench)
    fi
    # SIGTERM at the deadline: the bench writes what it measured, then exits 124
    timeout -k 20 "$(box $((budget + 25)))" "${BENCH[@]}" --out "$OUT" --time-budget "$budget" "$@" 2>&1
    rc=$?
    SUMMARY+=("bench rc=$rc ($((SECONDS - start)) s)")
  fi
fi

n=$(find "$OUT" -type f | wc -l)
if (( n > 8 )); then  # the device call returns 8 files at most: one archive instead
  tar -czf /tmp/run.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/run.tgz "$OUT/run.tgz"
  echo "gpu_run: $n files packed into \$OUT/run.tgz"
fi
echo "gpu_run: ${SUMMARY[*]:-nothing run}; total ${SECONDS} s; $(find "$OUT" -type f | wc -l) files in \$OUT"
