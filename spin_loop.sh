#!/usr/bin/env bash
# spin_loop.sh: the whole SPIN-Diffusion loop, K iterations of
#     generate.py (theta_k samples the training prompts) -> train_spin.py (theta_k -> theta_{k+1}, theta_k as reference)
# then sample.py (base and every iteration, held-out prompts, the same seeds) and evaluate.py (scores, tables, plots).
#
#   bash spin_loop.sh                 # offline demo: the toy world (no hub, no GPU), 3 iterations, minutes on 2 cores
#   bash spin_loop.sh --recipe sd15   # the paper's recipe: SD-1.5 + Pick-a-Pic v2 (GPU; see README)
#   bash spin_loop.sh --recipe sd21   # the same on SD-2.1 (v-prediction, 768x768)
#   bash spin_loop.sh --recipe sdxl   # SDXL base at 1024x1024 with LoRA, one GPU
#
# Every setting is a flag (--iterations 2) or an environment variable (ITERATIONS=2); flags win. Each stage's
# folder is named by iteration under RUN_DIR; re-running after an interruption resumes: finished stages are skipped
# by the scripts themselves, interrupted ones continue (generate/sample skip finished images, train_spin.py resumes
# from its latest checkpoint, evaluate.py reuses finished scores).
set -euo pipefail
cd "$(dirname "$0")"

# ---- flags: --some_name VALUE sets SOME_NAME ---------------------------------------------------------------------
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    --*=*) n="${1%%=*}"; n="${n#--}"; n="${n^^}"; export "${n//-/_}=${1#*=}"; shift ;;
    --*) [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
         n="${1#--}"; n="${n^^}"; export "${n//-/_}=$2"; shift 2 ;;
    *) echo "error: unexpected argument '$1' (settings are --name value)" >&2; exit 2 ;;
  esac
done

RECIPE=${RECIPE:-demo}
ITERATIONS=${ITERATIONS:-3}
PYTHON=${PYTHON:-python}
LAUNCH=${LAUNCH:-$PYTHON}          # e.g. LAUNCH="accelerate launch --num_processes 8" for many GPUs
EXTRA_GENERATE_ARGS=${EXTRA_GENERATE_ARGS:-}
EXTRA_TRAIN_ARGS=${EXTRA_TRAIN_ARGS:-}
EXTRA_SAMPLE_ARGS=${EXTRA_SAMPLE_ARGS:-}
EXTRA_EVALUATE_ARGS=${EXTRA_EVALUATE_ARGS:-}

if [[ "$RECIPE" == demo ]]; then
  # The toy world (toy_world.py): 12 captions of coloured shapes, 32x32 images, a tiny SD-shaped pipeline and a
  # theta_0 pre-trained with train_spin.py --loss sft. The scorers are tiny RANDOM models: their numbers only show
  # the plumbing. The meaningful number here is the Frechet distance to held-out real images, measured on the pictures
  # (image space; lower is better), plotted per iteration in eval/fd_across_iterations.png.
  RUN_DIR=${RUN_DIR:-runs/demo}
  WORLD=${WORLD:-$RUN_DIR/world}
  WORLD_FLAGS=${WORLD_FLAGS:-}     # toy_world.py build flags, e.g. --seed 1 or --quick (shorter decoder training; CI)
  # shellcheck disable=SC2086
  $PYTHON toy_world.py build --output_dir "$WORLD" $WORLD_FLAGS
  MODEL=${MODEL:-$WORLD/pipeline}
  UNET0=${UNET0:-$WORLD/theta0}
  DATASET=${DATASET:-$WORLD/data/train.parquet}; SPLIT=${SPLIT:-train}
  TEST_DATASET=${TEST_DATASET:-$WORLD/data/test.parquet}; TEST_SPLIT=${TEST_SPLIT:-train}
  RESOLUTION=${RESOLUTION:-32}
  GEN_IMAGES=${GEN_IMAGES:-32}; GEN_STEPS=${GEN_STEPS:-10}; GUIDANCE=${GUIDANCE:-7.5}; SCHEDULER=${SCHEDULER:-ddim}
  GEN_BATCH=${GEN_BATCH:-64}
  TRAIN_BATCH=${TRAIN_BATCH:-32}; GRAD_ACCUM=${GRAD_ACCUM:-1}; LR=${LR:-1e-5}; LR_SCHEDULER=${LR_SCHEDULER:-constant}
  WARMUP=${WARMUP:-0}; STEPS=${STEPS:-100}; BETA=${BETA:-2000}; MIXED_PRECISION=${MIXED_PRECISION:-no}
  # The toy world's measured choice (docs/toy_world.md): in image space SPIN on the sampler's latents beat SPIN on the
  # re-encoded images on 3 of 3 seeds, and only the former moved theta_0 at all.
  SYNTHETIC_LATENT=${SYNTHETIC_LATENT:-sampler}
  # One torch thread per stage: the tiny models gain nothing from more, and on a small shared machine OpenMP threads
  # spinning against other work made one training step 40x slower (12 s instead of 0.3 s; toy_world.py does the same).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  SAMPLE_PROMPTS=${SAMPLE_PROMPTS:-12}; SAMPLE_IMAGES=${SAMPLE_IMAGES:-4}; SAMPLE_STEPS=${SAMPLE_STEPS:-10}
  SCORERS=${SCORERS:-$RUN_DIR/demo_scorers}
  if [[ ! -f "$SCORERS/evaluate_flags.txt" ]]; then $PYTHON tests/tiny_scorers.py "$SCORERS" > /dev/null; fi
  mapfile -t SCORER_FLAGS < "$SCORERS/evaluate_flags.txt"
  SCORER_FLAGS+=(--device cpu --mixed_precision no)
  DATA_FLAGS=()
  CACHE_DIR=${CACHE_DIR:-$RUN_DIR/cache}   # the demo keeps everything it makes under RUN_DIR
elif [[ "$RECIPE" == sd15 || "$RECIPE" == sd21 ]]; then
  # The model card's recipe. One GPU: GRAD_ACCUM=256 gives the card's 2048 pairs per step with TRAIN_BATCH=8;
  # 8 GPUs: LAUNCH="accelerate launch --num_processes 8" GRAD_ACCUM=32. sd21: the same on SD-2.1 (v-prediction:
  # train_spin.py takes the velocity target from its scheduler) at 768x768, batch 4 x 512.
  if [[ "$RECIPE" == sd15 ]]; then
    MODEL=${MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}; RESOLUTION=${RESOLUTION:-512}
    TRAIN_BATCH=${TRAIN_BATCH:-8}; GRAD_ACCUM=${GRAD_ACCUM:-256}; GEN_BATCH=${GEN_BATCH:-16}
  else
    MODEL=${MODEL:-stabilityai/stable-diffusion-2-1}; RESOLUTION=${RESOLUTION:-768}
    TRAIN_BATCH=${TRAIN_BATCH:-4}; GRAD_ACCUM=${GRAD_ACCUM:-512}; GEN_BATCH=${GEN_BATCH:-8}
  fi
  RUN_DIR=${RUN_DIR:-runs/$RECIPE}
  UNET0=${UNET0:-base}
  DATASET=${DATASET:-yuvalkirstain/pickapic_v2}; SPLIT=${SPLIT:-train}
  MAX_TRAIN_SAMPLES=${MAX_TRAIN_SAMPLES:-}     # e.g. 100000 for a first run; empty: the whole split
  TEST_DATASET=${TEST_DATASET:-yuvalkirstain/pickapic_v2}; TEST_SPLIT=${TEST_SPLIT:-test_unique}
  GEN_IMAGES=${GEN_IMAGES:-1}; GEN_STEPS=${GEN_STEPS:-50}; GUIDANCE=${GUIDANCE:-7.5}; SCHEDULER=${SCHEDULER:-}
  LR=${LR:-2e-5}; LR_SCHEDULER=${LR_SCHEDULER:-linear}
  WARMUP=${WARMUP:-200}; STEPS=${STEPS:-500}; BETA=${BETA:-5000}; MIXED_PRECISION=${MIXED_PRECISION:-bf16}
  SAMPLE_PROMPTS=${SAMPLE_PROMPTS:-500}; SAMPLE_IMAGES=${SAMPLE_IMAGES:-5}; SAMPLE_STEPS=${SAMPLE_STEPS:-50}
  SCORER_FLAGS=()
  DATA_FLAGS=(--streaming)
  [[ -n "$MAX_TRAIN_SAMPLES" ]] && DATA_FLAGS+=(--max_train_samples "$MAX_TRAIN_SAMPLES")
  EXTRA_TRAIN_ARGS="--gradient_checkpointing --use_8bit_adam --allow_tf32 --checkpointing_steps 50 --checkpoints_total_limit 2 $EXTRA_TRAIN_ARGS"
elif [[ "$RECIPE" == sdxl ]]; then
  # SDXL base at 1024x1024 on one GPU with LoRA. Training settings from diffusers' Diffusion-DPO SDXL LoRA example
  # (examples/research_projects/diffusion_dpo: rank 8, lr 1e-5 constant, no warmup, batch 8 x accumulation 2,
  # gradient checkpointing, 8-bit AdamW, beta 5000, 2000 steps); SDXL's own sampling default, guidance 5.
  # bf16 rather than fp16: SDXL's VAE is upcast where its config asks, and bf16 needs no fp16-fix VAE.
  RUN_DIR=${RUN_DIR:-runs/sdxl}
  MODEL=${MODEL:-stabilityai/stable-diffusion-xl-base-1.0}
  UNET0=${UNET0:-base}
  DATASET=${DATASET:-yuvalkirstain/pickapic_v2}; SPLIT=${SPLIT:-train}
  MAX_TRAIN_SAMPLES=${MAX_TRAIN_SAMPLES:-32000}   # 2000 steps x 16 pairs: each real row seen once per iteration
  TEST_DATASET=${TEST_DATASET:-yuvalkirstain/pickapic_v2}; TEST_SPLIT=${TEST_SPLIT:-test_unique}
  RESOLUTION=${RESOLUTION:-1024}
  GEN_IMAGES=${GEN_IMAGES:-1}; GEN_STEPS=${GEN_STEPS:-50}; GUIDANCE=${GUIDANCE:-5.0}; SCHEDULER=${SCHEDULER:-}
  GEN_BATCH=${GEN_BATCH:-4}
  TRAIN_BATCH=${TRAIN_BATCH:-8}; GRAD_ACCUM=${GRAD_ACCUM:-2}; LR=${LR:-1e-5}; LR_SCHEDULER=${LR_SCHEDULER:-constant}
  WARMUP=${WARMUP:-0}; STEPS=${STEPS:-2000}; BETA=${BETA:-5000}; MIXED_PRECISION=${MIXED_PRECISION:-bf16}
  SAMPLE_PROMPTS=${SAMPLE_PROMPTS:-500}; SAMPLE_IMAGES=${SAMPLE_IMAGES:-5}; SAMPLE_STEPS=${SAMPLE_STEPS:-50}
  LORA_RANK=${LORA_RANK:-8}
  SCORER_FLAGS=()
  DATA_FLAGS=(--streaming)
  [[ -n "$MAX_TRAIN_SAMPLES" ]] && DATA_FLAGS+=(--max_train_samples "$MAX_TRAIN_SAMPLES")
  EXTRA_TRAIN_ARGS="--lora_rank $LORA_RANK --gradient_checkpointing --use_8bit_adam --allow_tf32 --checkpointing_steps 250 --checkpoints_total_limit 2 $EXTRA_TRAIN_ARGS"
else
  echo "error: --recipe must be demo, sd15, sd21 or sdxl, not '$RECIPE'" >&2; exit 2
fi
SEED=${SEED:-0}
SYNTHETIC_LATENT=${SYNTHETIC_LATENT:-}   # train_spin.py --synthetic_latent (image | sampler); empty: train_spin.py's default
SYN_FLAGS=(); [[ -n "$SYNTHETIC_LATENT" ]] && SYN_FLAGS=(--synthetic_latent "$SYNTHETIC_LATENT")
CACHE_FLAGS=(); [[ -n "${CACHE_DIR:-}" ]] && CACHE_FLAGS=(--cache_dir "$CACHE_DIR")
SCHED_FLAGS=(); [[ -n "$SCHEDULER" ]] && SCHED_FLAGS=(--scheduler "$SCHEDULER")
mkdir -p "$RUN_DIR"
say() { printf '\n=== %s\n' "$*"; }
t_start=$(date +%s)

# ---- K iterations: theta_k generates, theta_k -> theta_{k+1} ----------------------------------------------------
unet_k=$UNET0
for ((k = 0; k < ITERATIONS; k++)); do
  say "iteration $((k + 1))/$ITERATIONS: generate with theta_$k ($unet_k)"
  # shellcheck disable=SC2086
  $LAUNCH generate.py --pretrained_model_name_or_path "$MODEL" --unet "$unet_k" \
    --dataset "$DATASET" --split "$SPLIT" "${DATA_FLAGS[@]}" \
    --num_images_per_prompt "$GEN_IMAGES" --num_inference_steps "$GEN_STEPS" --guidance_scale "$GUIDANCE" \
    "${SCHED_FLAGS[@]}" --resolution "$RESOLUTION" --batch_size "$GEN_BATCH" --seed "$((SEED + k))" \
    --mixed_precision "$MIXED_PRECISION" --output_dir "$RUN_DIR/synth_$k" $EXTRA_GENERATE_ARGS

  say "iteration $((k + 1))/$ITERATIONS: train theta_$((k + 1)) from theta_$k against its own samples"
  # shellcheck disable=SC2086
  $LAUNCH train_spin.py --pretrained_model_name_or_path "$MODEL" --unet "$unet_k" \
    --dataset "$DATASET" --split "$SPLIT" "${DATA_FLAGS[@]}" --synthetic_dir "$RUN_DIR/synth_$k" \
    --resolution "$RESOLUTION" --train_batch_size "$TRAIN_BATCH" --gradient_accumulation_steps "$GRAD_ACCUM" \
    --learning_rate "$LR" --lr_scheduler "$LR_SCHEDULER" --lr_warmup_steps "$WARMUP" --max_train_steps "$STEPS" \
    --beta "$BETA" --seed "$SEED" --mixed_precision "$MIXED_PRECISION" "${SYN_FLAGS[@]}" \
    "${CACHE_FLAGS[@]}" --resume_from_checkpoint latest --output_dir "$RUN_DIR/iter_$((k + 1))" $EXTRA_TRAIN_ARGS
  unet_k=$RUN_DIR/iter_$((k + 1))
done

# ---- held-out samples of every model with the same seeds, then scores ------------------------------------------
say "sample theta_0 .. theta_$ITERATIONS on held-out prompts (same seeds for every model)"
models=(--unet "base=$UNET0")
for ((k = 1; k <= ITERATIONS; k++)); do models+=(--unet "iter_$k=$RUN_DIR/iter_$k"); done
# shellcheck disable=SC2086
$PYTHON sample.py --pretrained_model_name_or_path "$MODEL" "${models[@]}" \
  --dataset "$TEST_DATASET" --split "$TEST_SPLIT" --max_prompts "$SAMPLE_PROMPTS" \
  --num_images_per_prompt "$SAMPLE_IMAGES" --num_inference_steps "$SAMPLE_STEPS" --guidance_scale "$GUIDANCE" \
  "${SCHED_FLAGS[@]}" --resolution "$RESOLUTION" --seed 1234 --mixed_precision "$MIXED_PRECISION" \
  --output_dir "$RUN_DIR/samples" $EXTRA_SAMPLE_ARGS

say "evaluate"
# shellcheck disable=SC2086
$PYTHON evaluate.py "$RUN_DIR/samples" --output_dir "$RUN_DIR/eval" "${SCORER_FLAGS[@]}" $EXTRA_EVALUATE_ARGS

# ---- pictures: training curves per iteration, metrics across iterations -------------------------------------------
$PYTHON - "$RUN_DIR" "$ITERATIONS" "$RECIPE" <<'PY'
import json, sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

run, K, recipe = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
keys = [("loss", "loss"), ("implicit_acc", "implicit accuracy"),
        ("real_logratio", "real term -(m_r - r_r)"), ("syn_logratio", "synthetic term -(m_s - r_s)")]
fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
for k in range(1, K + 1):
    rows = [json.loads(l) for l in (run / f"iter_{k}" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    for ax, (key, title) in zip(axes, keys):
        ax.plot([r["step"] for r in rows], [r.get(key) for r in rows], label=f"iteration {k}")
        ax.set_title(title)
        ax.set_xlabel("step")
axes[0].axhline(0.6931, color="grey", lw=0.5, ls="--")
axes[0].legend()
fig.tight_layout()
fig.savefig(run / "eval" / "training_curves.png", dpi=110)
if recipe == "demo":  # the demo's scorers are random stand-ins: their plot would be flat lines; its FD plot is below
    sys.exit(0)

summary = json.loads((run / "eval" / "summary.json").read_text())
models, metrics, table = summary["models"], summary["metrics"], summary["summary"]
fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
for ax, m in zip(axes[0], metrics):
    mean = [table[n][m]["mean"]["mean"] for n in models]
    std = [table[n][m]["mean"]["std"] for n in models]
    ax.errorbar(range(len(models)), mean, yerr=std, fmt="o-", capsize=4)
    ax.set_xticks(range(len(models)), models)
    ax.set_title(f"{m} (mean ± std over prompts)")
fig.tight_layout()
fig.savefig(run / "eval" / "metrics_across_iterations.png", dpi=110)
PY

say "summary ($(($(date +%s) - t_start)) s)"
[[ "$RECIPE" == demo ]] && echo "(demo: the four scorers are tiny RANDOM models; their numbers only show that every stage ran)"
cat "$RUN_DIR/eval/summary.md"
if [[ "$RECIPE" == demo ]]; then
  say "Frechet distance to held-out real images (image space; lower is better; the demo's meaningful number)"
  fd_args=(--unet "$UNET0"); names=(theta_0)
  for ((k = 1; k <= ITERATIONS; k++)); do fd_args+=(--unet "$RUN_DIR/iter_$k"); names+=("iter_$k"); done
  $PYTHON toy_world.py fd --world "$WORLD" "${fd_args[@]}" --names "${names[@]}" --json "$RUN_DIR/eval/fd.json" \
    --plot "$RUN_DIR/eval/fd_across_iterations.png" --grid "$RUN_DIR/eval/sample_grid.png"
  plots="$RUN_DIR/eval/training_curves.png  $RUN_DIR/eval/fd_across_iterations.png  $RUN_DIR/eval/sample_grid.png"
else
  plots="$RUN_DIR/eval/training_curves.png  $RUN_DIR/eval/metrics_across_iterations.png"
fi
cat <<EOF

Where everything is:
  synthetic data   $RUN_DIR/synth_0 .. synth_$((ITERATIONS - 1))
  trained UNets    $RUN_DIR/iter_1 .. iter_$ITERATIONS  (unet/, metrics.jsonl, run_config.json)
  samples          $RUN_DIR/samples/<model>/  and  $RUN_DIR/samples/grid.png
  scores, tables   $RUN_DIR/eval/  (summary.md, summary.json, scores.jsonl)
  plots            $plots
EOF
