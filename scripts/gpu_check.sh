#!/usr/bin/env bash
# One-shot GPU measurement of the F0 training step (issue 7), for a lent
# device machine (one H100/H200). Run from the repository root there:
#
#   carry: [".whl"]     timeout_s: 600
#   command: bash scripts/gpu_check.sh
#
# Prepare .whl here first (pure-Python packages the device image lacks; the
# image has jax[cuda13] 0.11.x, optax, chex, numpy, absl-py, tabulate, pyyaml):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl dm-haiku==0.0.17 jmp==0.0.4 ml-collections==1.1.0
#
# Measures F0 at 192 px, bf16, global batch 128 and 256 on one GPU (the real
# pmap'd step: AGC, weight decay, Nesterov SGD, EMA), img/s, step time,
# compile time, peak memory and MFU, as JSON lines in $OUT/gpu_bench.jsonl,
# logs in $OUT/log_*.txt, and a per-op trace of two batch-256 steps
# ($OUT/f0_b256.xplane.pb.gz, read with jax._src.lib._profile_data).
# Expected device time: ~1-2 min start + 3 runs of ~1-2 min (compile-bound).
set -uo pipefail
OUT="${OUT:-/tmp/nfnets_gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv
  python3 -c 'import sys, jax, jaxlib, haiku, optax; print(sys.version.split()[0], "jax", jax.__version__, "haiku", haiku.__version__, "optax", optax.__version__); print(jax.devices())'
} 2>&1 | tee "$OUT/env.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo 'gpu_check: environment check failed'; exit 1; }

# Runs, most important first (each one's results are on disk as soon as it
# ends, so a time-out loses only the runs after it):
#   F0 bf16 batch 128; batch 256 (+ a 2-step per-op trace); batch 256 with
#   conv_lowering=cpu (one dense conv per group, the CPU lowering) to see
#   whether cuDNN's grouped convs are the bottleneck on the GPU too.
# GPU_CHECK_RUNS / GPU_CHECK_ARGS: only for a dry run of this script on a CPU
# with a tiny model, e.g. GPU_CHECK_RUNS="2 4:trace" GPU_CHECK_ARGS="--width
# 0.0625 --depth 1,1,1,1 --group_size 8 --image_size 16 --dtype f32".
RUNS=(${GPU_CHECK_RUNS:-128 256:trace 256:split})
status=0
first=1
for run in "${RUNS[@]}"; do
  b=${run%%:*}; tag=${run#*:}; [ "$tag" = "$run" ] && tag=''
  extra=()
  case "$tag" in
    trace) extra=(--profile_steps 2 --profile_out "$OUT/f0_b$b.xplane.pb") ;;
    split) extra=(--conv_lowering cpu) ;;
  esac
  name="b$b${tag:+_$tag}"
  timeout "${GPU_CHECK_RUN_TIMEOUT:-200}" python3 scripts/benchmark.py \
    --model F0 --image_size 192 --dtype bf16 --batch_size "$b" --steps 30 \
    --warmup 5 --windows 5 --json_out "$OUT/gpu_bench.jsonl" "${extra[@]}" \
    ${GPU_CHECK_ARGS:-} 2>&1 | tee "$OUT/log_$name.txt"
  rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then
    echo "gpu_check: run $name failed (rc $rc)"; status=$rc
    [ "$first" = 1 ] && break  # the first run failing: stop
  fi
  first=0
done
gzip -f "$OUT"/*.xplane.pb 2>/dev/null

python3 - "$OUT/gpu_bench.jsonl" <<'PY' || true
import json, sys
print('\nbatch  impl    img/s     step_ms  compile_s  peak_mem_GiB  TFLOP/s  MFU     device')
for line in open(sys.argv[1]):
  r = json.loads(line)
  mem = r['peak_mem_bytes'] / 2**30 if r['peak_mem_bytes'] else float('nan')
  mfu = f"{100 * r['mfu']:.1f}%" if r['mfu'] is not None else 'n/a'
  impl = r['overrides'].get('conv_lowering', 'default')
  print(f"{r['batch_size']:<6d} {impl:<7s} {r['img_per_s']:<9.1f} {r['step_ms']:<8.2f} "
        f"{r['compile_s']:<10.1f} {mem:<13.2f} {r['achieved_tflops']:<8.1f} "
        f"{mfu:<7s} {r['device_kind']} ({r['peak_mem_source']})")
PY
exit $status
