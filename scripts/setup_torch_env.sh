#!/usr/bin/env bash
# Optional, isolated PyTorch + timm environment for the side-by-side benchmark
# (scripts/bench_timm.py, scripts/benchmark.py --compare_timm). torch/timm are
# NOT core dependencies of nfnets; they live in their own venv, by default
# <repo>/.venv-torch (git-ignored). Idempotent: re-running only checks.
#
# Why this recipe (machine facts, see the env docs of this workplace):
#  * timm imports torchvision at `import timm` (timm/layers/create_norm.py:
#    `from torchvision.ops.misc import FrozenBatchNorm2d`), so torch alone
#    (`pip install torch==2.13.0`, the CPU wheel on local disk) is not enough.
#  * PyPI's torchvision wheels are CUDA builds linked against libtorch_cuda /
#    libc10_cuda; beside the CPU-only torch 2.13.0 wheel their C extension does
#    not load and `import torchvision` fails ("operator torchvision::nms does
#    not exist").
#  * A matching torch/torchvision pair does work (and runs on the CPU):
#    x86_64: torch==2.14.1 torchvision==0.29.1 (CUDA builds; pip on Python
#    3.11 takes them and their nvidia-* libraries from local disk here;
#    ~5.5 GB in the venv); aarch64: torch==2.9.1 torchvision==0.24.1 (CPU).
#    timm is then installed normally (pure Python; needs pyyaml,
#    huggingface_hub, safetensors).
# Usage: bash scripts/setup_torch_env.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-torch}"
PY="${PYTHON:-python3}"
TIMM_VERSION="${TIMM_VERSION:-1.0.31}"
case "$(uname -m)" in
  x86_64)  TORCH=2.14.1; TV=0.29.1 ;;
  aarch64) TORCH=2.9.1;  TV=0.24.1 ;;
  *) echo "unsupported machine $(uname -m)" >&2; exit 1 ;;
esac

check() {
  "$VENV/bin/python" - "$TORCH" "$TV" <<'PY' 2>/dev/null
import sys
import torch, torchvision, timm
ok = (torch.__version__.split('+')[0] == sys.argv[1]
      and torchvision.__version__.split('+')[0] == sys.argv[2])
timm.create_model('dm_nfnet_f0', pretrained=False, num_classes=10)
print(f'torch {torch.__version__} torchvision {torchvision.__version__} '
      f'timm {timm.__version__}')
sys.exit(0 if ok else 1)
PY
}

if [ -x "$VENV/bin/python" ] && check; then
  echo "setup_torch_env: $VENV is ready"; exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "torch==$TORCH" "torchvision==$TV"
"${PIP[@]}" "timm==$TIMM_VERSION" pyyaml huggingface_hub safetensors numpy
check
echo "setup_torch_env: $VENV is ready"
