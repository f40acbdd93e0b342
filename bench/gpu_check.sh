#!/usr/bin/env bash
# The GPU check of issue 4, prepared for a session that is lent a GPU (the `device` tool's H200), in one call:
#
#   here, once:   bash bench/gpu_check.sh --prepare      # wheels the GPU image lacks, into .whl/ (git-ignored)
#   device run:   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=590)
#   CPU rehearsal: OUT=/tmp/gpu_check SD_LORA_GPU_CHECK_TINY=1 bash bench/gpu_check.sh
#
# On the device it installs the wheels into /tmp/site, prints the versions and the GPU, runs the GPU-marked tests,
# then bench/bench.py on the SD1.5 architecture, most important configurations first. Everything it measures lands
# in $OUT as it goes (bench.py rewrites its JSON after every configuration), so a run cut short by the time limit
# still brings back what it finished. Commit $OUT/h200.json as bench/results/h200.json, with the logs' figures in
# the README's Speed table.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  # The H200 image (see /work/.library/device/KINDS.md) has torch, transformers, peft, accelerate, safetensors and
  # pyarrow, but no diffusers, datasets or fastcore: these travel as Python 3.12 wheels, pinned as in CI. A fallback
  # datasets (5.0.0, for pyarrow >= 21) goes beside them, for an image whose pyarrow is older than 24.
  rm -rf .whl && mkdir -p .whl/fallback
  get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"; }
  get -d .whl diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fastcore==1.14.5 peft==0.21.2 \
      transformers==5.24.0 importlib_metadata
  get -d .whl/fallback datasets==5.0.0
  du -sh .whl && ls .whl .whl/fallback
  exit 0
fi

OUT="${OUT:?set OUT to the folder for the results (the device tool sets it)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1 PYTHONPATH="$PWD"
if [ -d .whl ] && [ -z "${SD_LORA_GPU_CHECK_TINY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
  if ! python3 -c "import datasets" 2>/dev/null; then
    echo "datasets 5.2.0 does not import here (pyarrow older than 24?): installing the fallback, 5.0.0"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/fallback/*.whl || exit 1
  fi
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 - <<'EOF'
import platform, torch, diffusers, transformers, peft, accelerate, datasets, pyarrow, sd_lora
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("diffusers", diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "accelerate", accelerate.__version__, "datasets", datasets.__version__, "pyarrow", pyarrow.__version__)
try:
    import bitsandbytes; print("bitsandbytes", bitsandbytes.__version__)
except ImportError: print("bitsandbytes: not installed (the 8-bit Adam row will say so)")
EOF
} 2>&1 | tee "$OUT/versions.txt" || exit 1

echo "== GPU-marked tests"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cli.py tests/test_inference.py \
  tests/test_inference_dispatch.py tests/test_train.py \
  --deselect "tests/test_train.py::test_cuda_graphs_train_the_same_maths[unet]" 2>&1 | tee "$OUT/pytest-gpu.log"

echo "== throughput, most important first"
# the documented run's candidates first, the slowest compilation (the whole UNet) late
CONFIGS=documented,documented-merged,documented-graphs,documented-compiled,b8,b32,documented-merged-checkpointing
CONFIGS=$CONFIGS,b8-compiled,b32-compiled,documented-unet-graphs,b8-checkpointing,b8-8bit-adam,documented-fp32,b16
CONFIGS=$CONFIGS,documented-plain,b8-unet-compiled
if [ -n "${SD_LORA_GPU_CHECK_TINY:-}" ]; then  # the CPU rehearsal: the tiny model, the CPU's configurations
  timeout 300 python3 bench/bench.py --tiny --steps 2 --warmup 1 --images 8 --configs documented,documented-merged,b8 \
    --out "$OUT/h200.json" 2>&1 | tee "$OUT/bench.log"
else
  timeout 380 python3 bench/bench.py --steps 20 --warmup 5 --images 160 --configs "$CONFIGS" \
    --out "$OUT/h200.json" 2>&1 | tee "$OUT/bench.log"
fi
echo "== done: $(ls "$OUT")"
