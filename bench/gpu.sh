#!/usr/bin/env bash
# The GPU measurements of the README's performance section, as one call on a GPU machine with no hub access:
# SD-1.5-architecture random weights (bench/sd15/ configs), bf16 training step table, generation images/s.
#   On this machine first:  bash ../shared/gpu/wheels.sh   (fills .whl/ with diffusers, datasets, bitsandbytes)
#   Then on the GPU:        bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -d .whl ]] && ! python3 -c "import diffusers" 2>/dev/null; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 bench/make_sd15.py /tmp/spin_bench/sd15 > /dev/null
OUT=${OUT:-/tmp}
python3 bench/bench_train.py --model sd15 --mixed_precision bf16 --batch_sizes 1,4,8 --steps 10 --warmup 3 \
  --json "$OUT/bench_train.json"
python3 bench/bench_generate.py --pipeline /tmp/spin_bench/sd15 --resolution 512 --steps 50 --num_prompts 16 \
  --images_per_prompt 1 --batch_size 16 --mixed_precision bf16 --repeats 1
