#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, as ONE call on a GPU machine with no hub access.
# Random weights of the real architectures (bench/sd15, bench/sdxl configs; speed and memory do not depend on
# the values), every training run through train_spin.py's command line (bench/bench_steps.py):
#   1. SDXL LoRA rank 8 at 1024², batch 1/2/4/8, the sdxl recipe's flags (bf16, gradient checkpointing, 8-bit
#      AdamW): pairs/s, peak allocated/reserved per batch, largest batch within 24 / 80 GiB; OOM is a table entry
#   2. SD-1.5 full fine-tune at 512², bf16, cached latents: 8-bit AdamW / AdamW x with / without checkpointing
#      (the sd15 recipe's 8-bit + checkpointing first)
#   3. generation at 512², 50 steps, guidance 7.5: generate.py's batched path vs one pipeline call per prompt
#   4. if time is left: SDXL LoRA without checkpointing; bench_train.py (ours vs the straightforward step, MFU)
# Output: $OUT/gpu_bench.json and $OUT/gpu_bench.md (rewritten after each part, so a cut-off run still reports),
# $OUT/log.txt. Runs not started before BUDGET_S seconds (default 510) are listed as skipped.
#   Here first:  bash ../shared/gpu/wheels.sh      (fills .whl/ with diffusers, datasets, bitsandbytes, peft)
#                bash bench/gpu.sh --cpu-smoke     (the same script on tiny models on CPU: a few minutes)
#   On the GPU:  bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=${SMOKE:-0}
[[ "${1:-}" == --cpu-smoke ]] && SMOKE=1
if [[ -d .whl ]] && ! python3 -c "import diffusers, peft, bitsandbytes" 2>/dev/null; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/spin_bench_out}
WORK=${WORK:-/tmp/spin_bench}
mkdir -p "$OUT" "$WORK"
deadline=$(( $(date +%s) + ${BUDGET_S:-510} ))
left() { echo $(( deadline - $(date +%s) )); }
log() { tee -a "$OUT/log.txt"; }
report() { python3 bench/gpu_report.py "$OUT" > /dev/null; }

if [[ "$SMOKE" == 1 ]]; then
  # tiny.py's SD- and SDXL-layout pipelines, 32², 2 steps: every code path of the GPU run, in minutes on CPU
  export CUDA_VISIBLE_DEVICES=""
  python3 -c "import tiny; from pathlib import Path; w = Path('$WORK')
if not (w / 'tiny_sd/model_index.json').is_file(): tiny.build_tiny_pipeline(w / 'tiny_sd')
if not (w / 'tiny_sdxl/model_index.json').is_file(): tiny.build_tiny_sdxl_pipeline(w / 'tiny_sdxl')"
  SD=$WORK/tiny_sd XL=$WORK/tiny_sdxl RES_SD=32 RES_XL=32 SD_BATCHES=1,2 XL_BATCHES=1,2 STEPS=2 WARMUP=1
  GEN=(--resolution 32 --steps 2 --num_prompts 2 --batch_size 2)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | log
  [[ -f $WORK/sd15/model_index.json ]] || python3 bench/make_sd15.py "$WORK/sd15" > /dev/null
  python3 bench/make_sdxl.py "$WORK/sdxl" > /dev/null
  SD=$WORK/sd15 XL=$WORK/sdxl RES_SD=512 RES_XL=1024 SD_BATCHES=1,8,16 XL_BATCHES=1,2,4,8 STEPS=6 WARMUP=2
  GEN=(--resolution 512 --steps 50 --num_prompts 16 --batch_size 16 --mixed_precision bf16)
fi
# A part that fails is logged and the next one runs: one call should bring back all it can.
steps() { python3 bench/bench_steps.py --steps "$STEPS" --warmup "$WARMUP" --work "$WORK/steps" --deadline "$deadline" \
  --json "$OUT/steps.json" "$@" 2>&1 | log || echo "bench_steps.py failed: $*" | log; report; }

echo "== 1. SDXL LoRA rank 8 ($(left) s left)" | log
steps --label sdxl_lora_gc_8bit --pipeline "$XL" --resolution "$RES_XL" --batch_sizes "$XL_BATCHES" \
  --common "--mixed_precision bf16 --allow_tf32" --variants "lora8 gc 8bit=--lora_rank 8 --gradient_checkpointing --use_8bit_adam"
echo "== 2. SD-1.5 full fine-tune ($(left) s left)" | log
steps --label sd15_full --pipeline "$SD" --resolution "$RES_SD" --batch_sizes "$SD_BATCHES" \
  --common "--mixed_precision bf16 --allow_tf32" \
  --variants "8bit gc=--gradient_checkpointing --use_8bit_adam;adamw=;adamw gc=--gradient_checkpointing;8bit=--use_8bit_adam"
echo "== 3. generation ($(left) s left)" | log
python3 bench/bench_generate.py --pipeline "$SD" "${GEN[@]}" --images_per_prompt 1 --repeats 1 --json "$OUT/generate.json" 2>&1 | log \
  || echo "bench_generate.py failed" | log
report
if (( $(left) > 90 )); then
  echo "== 4. SDXL LoRA without gradient checkpointing ($(left) s left)" | log
  steps --label sdxl_lora_8bit_nogc --pipeline "$XL" --resolution "$RES_XL" --batch_sizes "$XL_BATCHES" \
    --common "--mixed_precision bf16 --allow_tf32" --variants "lora8 8bit=--lora_rank 8 --use_8bit_adam"
fi
if (( $(left) > 60 )); then  # in-process step of train_spin's internals: informative, not fatal if they changed
  echo "== 4b. bench_train.py ($(left) s left)" | log
  model=$([[ "$SMOKE" == 1 ]] && echo tiny || echo "$SD")
  python3 bench/bench_train.py --model "$model" --mixed_precision bf16 --batch_sizes 8 --variants plain --steps 5 --warmup 2 \
    --json "$OUT/bench_train.json" 2>&1 | log || echo "bench_train.py failed (non-fatal)" | log
fi
report
cat "$OUT/gpu_bench.md"
