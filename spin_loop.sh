#!/usr/bin/env bash
# spin_loop.sh: the whole SPIN-Diffusion loop, K iterations of
#     generate.py (theta_k samples the training prompts) -> train_spin.py (theta_k -> theta_{k+1}, theta_k as reference)
# then sample.py (base and every iteration, held-out prompts, the same seeds) and evaluate.py (scores, tables, plots).
#
#   bash spin_loop.sh                 # offline demo: the toy world (no hub, no GPU), 3 iterations, minutes on 2 cores
#   bash spin_loop.sh --recipe sd15   # the paper's recipe: SD-1.5 + Pick-a-Pic v2 (GPU; see README)
#   bash spin_loop.sh --recipe sd21   # the same on SD-2.1 (v-prediction, 768x768)
#   bash spin_loop.sh --recipe sdxl   # SDXL base at 1024x1024 with LoRA, one GPU
#   bash spin_loop.sh --recipe sd15 --baselines sft,dpo   # also the paper's SFT and Diffusion-DPO (its Table 1 rows)
#
# Every setting is a flag (--iterations 2) or an environment variable (ITERATIONS=2); flags win. Per-iteration
# settings take one value (every iteration) or one per iteration (--beta 2000,5000,5000). Each stage's folder is
# named by iteration under RUN_DIR; re-running after an interruption resumes: finished stages are skipped by the
# scripts themselves, interrupted ones continue (generate/sample skip finished images, train_spin.py resumes from its
# latest checkpoint, evaluate.py reuses finished scores). --dry_run 1 prints the commands and runs nothing.
set -euo pipefail
cd "$(dirname "$0")"

# ---- flags: --some_name VALUE sets SOME_NAME ---------------------------------------------------------------------
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
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
DATALOADER_WORKERS=${DATALOADER_WORKERS:-4}   # real recipes: train_spin.py's batches and noise draws made ahead in workers
EXTRA_GENERATE_ARGS=${EXTRA_GENERATE_ARGS:-}
EXTRA_TRAIN_ARGS=${EXTRA_TRAIN_ARGS:-}
EXTRA_SAMPLE_ARGS=${EXTRA_SAMPLE_ARGS:-}
EXTRA_EVALUATE_ARGS=${EXTRA_EVALUATE_ARGS:-}
DRY_RUN=${DRY_RUN:-}               # 1: print every stage's command instead of running it
die() { echo "error: $*" >&2; exit 2; }
[[ "$ITERATIONS" =~ ^[1-9][0-9]*$ ]] || die "--iterations must be a positive integer, not '$ITERATIONS'"

if [[ "$RECIPE" == demo ]]; then
  # The toy world (toy_world.py): 12 captions of coloured shapes, 32x32 images, a tiny SD-shaped pipeline and a
  # theta_0 pre-trained with train_spin.py --loss sft. The scorers are tiny RANDOM models: their numbers only show
  # the plumbing. The meaningful number here is the Frechet distance to held-out real images, measured on the pictures
  # (image space; lower is better), plotted per iteration in eval/fd_across_iterations.png.
  RUN_DIR=${RUN_DIR:-runs/demo}
  WORLD=${WORLD:-$RUN_DIR/world}
  WORLD_FLAGS=${WORLD_FLAGS:-}     # toy_world.py build flags, e.g. --seed 1 or --quick (shorter decoder training; CI)
  MODEL=${MODEL:-$WORLD/pipeline}
  UNET0=${UNET0:-$WORLD/theta0}
  DATASET=${DATASET:-$WORLD/data/train.parquet}; SPLIT=${SPLIT:-train}
  TEST_DATASET=${TEST_DATASET:-$WORLD/data/test.parquet}; TEST_SPLIT=${TEST_SPLIT:-train}
  RESOLUTION=${RESOLUTION:-32}
  GEN_IMAGES=${GEN_IMAGES:-32}; GEN_STEPS=${GEN_STEPS:-10}; GUIDANCE=${GUIDANCE:-7.5}; SCHEDULER=${SCHEDULER:-ddim}
  GEN_BATCH=${GEN_BATCH:-64}
  TRAIN_BATCH=${TRAIN_BATCH:-32}; GRAD_ACCUM=${GRAD_ACCUM:-1}; LR=${LR:-1e-4}; LR_SCHEDULER=${LR_SCHEDULER:-constant}
  WARMUP=${WARMUP:-0}; STEPS=${STEPS:-100}; BETA=${BETA:-2000}; MIXED_PRECISION=${MIXED_PRECISION:-no}
  # The toy world's measured choice (docs/toy_world.md): in image space SPIN on the sampler's latents beat SPIN on the
  # re-encoded images on 3 of 3 seeds, and only the former moved theta_0 at all.
  SYNTHETIC_LATENT=${SYNTHETIC_LATENT:-sampler}
  # One torch thread per stage: the tiny models gain nothing from more, and on a small shared machine OpenMP threads
  # spinning against other work made one training step 40x slower (12 s instead of 0.3 s; toy_world.py does the same).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  SAMPLE_PROMPTS=${SAMPLE_PROMPTS:-12}; SAMPLE_IMAGES=${SAMPLE_IMAGES:-4}; SAMPLE_STEPS=${SAMPLE_STEPS:-10}
  # Baselines with the SPIN iterations' own settings (lr, batch, beta), SFT as many steps as the 3 iterations
  # together, as the toy world's SFT arm (docs/toy_world.md); its checkpoints every 100 steps are the candidates.
  BASELINES=${BASELINES:-sft,dpo}
  SFT_LR=${SFT_LR:-$LR}; SFT_LR_SCHEDULER=${SFT_LR_SCHEDULER:-constant}; SFT_WARMUP=${SFT_WARMUP:-0}
  SFT_STEPS=${SFT_STEPS:-300}; SFT_CHECKPOINT_STEPS=${SFT_CHECKPOINT_STEPS:-100}
  # The toy world has 12 captions, every one in test.parquet: its validation uses the same captions at other seeds.
  VAL_DATASET=${VAL_DATASET:-$TEST_DATASET}; VAL_SPLIT=${VAL_SPLIT:-$TEST_SPLIT}
  VAL_PROMPTS=${VAL_PROMPTS:-12}; VAL_IMAGES=${VAL_IMAGES:-2}
  SCORERS=${SCORERS:-$RUN_DIR/demo_scorers}
  DATA_FLAGS=(); TRAIN_FLAGS=(); SPIN_CKPT_FLAGS=()
  CACHE_DIR=${CACHE_DIR:-$RUN_DIR/cache}   # the demo keeps everything it makes under RUN_DIR
elif [[ "$RECIPE" == sd15 || "$RECIPE" == sd21 ]]; then
  # The paper's recipe (arXiv 2402.10210, Appendix A.1; README "The real recipes" says which setting comes from
  # where). One GPU: GRAD_ACCUM=256 gives its 2048 pairs per step with TRAIN_BATCH=8; 8 GPUs:
  # LAUNCH="accelerate launch --num_processes 8" GRAD_ACCUM=32. sd21: the same on SD-2.1 (v-prediction:
  # train_spin.py takes the velocity target from its scheduler) at 768x768, batch 4 x 512.
  if [[ "$RECIPE" == sd15 ]]; then
    MODEL=${MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}; RESOLUTION=${RESOLUTION:-512}
    TRAIN_BATCH=${TRAIN_BATCH:-8}; GRAD_ACCUM=${GRAD_ACCUM:-256}; GEN_BATCH=${GEN_BATCH:-16}
    # Plain AdamW (the paper's) and no checkpointing fit an 80 GB card at batch 8 (README: estimated, not measured)
    GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-0}; ADAM8BIT=${ADAM8BIT:-0}
  else
    MODEL=${MODEL:-stabilityai/stable-diffusion-2-1}; RESOLUTION=${RESOLUTION:-768}
    TRAIN_BATCH=${TRAIN_BATCH:-4}; GRAD_ACCUM=${GRAD_ACCUM:-512}; GEN_BATCH=${GEN_BATCH:-8}
    GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-1}; ADAM8BIT=${ADAM8BIT:-0}  # 768² activations: not estimated
  fi
  RUN_DIR=${RUN_DIR:-runs/$RECIPE}
  UNET0=${UNET0:-base}
  DATASET=${DATASET:-yuvalkirstain/pickapic_v2}; SPLIT=${SPLIT:-train}
  MAX_TRAIN_SAMPLES=${MAX_TRAIN_SAMPLES:-}     # e.g. 100000 for a first run; empty: the whole split
  TEST_DATASET=${TEST_DATASET:-$DATASET}; TEST_SPLIT=${TEST_SPLIT:-test_unique}
  GEN_IMAGES=${GEN_IMAGES:-1}; GEN_STEPS=${GEN_STEPS:-50}; GUIDANCE=${GUIDANCE:-7.5}; SCHEDULER=${SCHEDULER:-}
  # SCHEDULE=paper: A.1's per-iteration lr / beta / steps, reproduced as written (iteration 1's 50 steps end inside
  # the 200-step warm-up, at a quarter of its lr); SCHEDULE=card: the model card's one recipe for every iteration.
  SCHEDULE=${SCHEDULE:-paper}
  case "$SCHEDULE" in
    paper) LR=${LR:-2e-5,2e-5,5e-8}; BETA=${BETA:-2000,5000,5000}; STEPS=${STEPS:-50,500,200} ;;
    card) LR=${LR:-2e-5}; BETA=${BETA:-5000}; STEPS=${STEPS:-500} ;;
    *) die "--schedule must be paper (Appendix A.1, per iteration) or card (the model card's one recipe), not '$SCHEDULE'" ;;
  esac
  LR_SCHEDULER=${LR_SCHEDULER:-linear}; WARMUP=${WARMUP:-200}; MIXED_PRECISION=${MIXED_PRECISION:-bf16}
  SAMPLE_PROMPTS=${SAMPLE_PROMPTS:-500}; SAMPLE_IMAGES=${SAMPLE_IMAGES:-5}; SAMPLE_STEPS=${SAMPLE_STEPS:-50}
  SAMPLE_SEED=${SAMPLE_SEED:-5775709}   # the paper's generation seed (through our per-image seeds: not its noise)
  # The paper's baselines: SFT on the winners, lr 1e-5, 500 warm-up steps then constant, batch 512 (a quarter of
  # SPIN's 2048: a quarter of its accumulation), checkpoint chosen on validation (its best: 2000 steps; how long it
  # ran is not stated: ours 3000, candidates every 500); Diffusion-DPO (reproduced): lr 2e-5, beta 2000, 350 steps,
  # SPIN's batch; its lr schedule is not stated: ours, SPIN's (200 warm-up, linear).
  SFT_LR=${SFT_LR:-1e-5}; SFT_LR_SCHEDULER=${SFT_LR_SCHEDULER:-constant_with_warmup}; SFT_WARMUP=${SFT_WARMUP:-500}
  SFT_STEPS=${SFT_STEPS:-3000}; SFT_CHECKPOINT_STEPS=${SFT_CHECKPOINT_STEPS:-500}
  SFT_GRAD_ACCUM=${SFT_GRAD_ACCUM:-$(( ${GRAD_ACCUM%%,*} / 4 > 0 ? ${GRAD_ACCUM%%,*} / 4 : 1 ))}
  DPO_LR=${DPO_LR:-2e-5}; DPO_BETA=${DPO_BETA:-2000}; DPO_STEPS=${DPO_STEPS:-350}
  SCORER_FLAGS=()
  DATA_FLAGS=(--streaming)
  [[ -n "$MAX_TRAIN_SAMPLES" ]] && DATA_FLAGS+=(--max_train_samples "$MAX_TRAIN_SAMPLES")
  TRAIN_FLAGS=(--allow_tf32 --dataloader_num_workers "$DATALOADER_WORKERS"); SPIN_CKPT_FLAGS=(--checkpointing_steps 50 --checkpoints_total_limit 2)
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
  TEST_DATASET=${TEST_DATASET:-$DATASET}; TEST_SPLIT=${TEST_SPLIT:-test_unique}
  RESOLUTION=${RESOLUTION:-1024}
  GEN_IMAGES=${GEN_IMAGES:-1}; GEN_STEPS=${GEN_STEPS:-50}; GUIDANCE=${GUIDANCE:-5.0}; SCHEDULER=${SCHEDULER:-}
  GEN_BATCH=${GEN_BATCH:-4}
  TRAIN_BATCH=${TRAIN_BATCH:-8}; GRAD_ACCUM=${GRAD_ACCUM:-2}; LR=${LR:-1e-5}; LR_SCHEDULER=${LR_SCHEDULER:-constant}
  WARMUP=${WARMUP:-0}; STEPS=${STEPS:-2000}; BETA=${BETA:-5000}; MIXED_PRECISION=${MIXED_PRECISION:-bf16}
  SAMPLE_PROMPTS=${SAMPLE_PROMPTS:-500}; SAMPLE_IMAGES=${SAMPLE_IMAGES:-5}; SAMPLE_STEPS=${SAMPLE_STEPS:-50}
  LORA_RANK=${LORA_RANK:-8}
  GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-1}; ADAM8BIT=${ADAM8BIT:-1}   # the example's, for 24 GB
  SFT_CHECKPOINT_STEPS=${SFT_CHECKPOINT_STEPS:-0}   # LoRA checkpoints do not load as a UNet: the final SFT only
  SCORER_FLAGS=()
  DATA_FLAGS=(--streaming)
  [[ -n "$MAX_TRAIN_SAMPLES" ]] && DATA_FLAGS+=(--max_train_samples "$MAX_TRAIN_SAMPLES")
  TRAIN_FLAGS=(--lora_rank "$LORA_RANK" --allow_tf32 --dataloader_num_workers "$DATALOADER_WORKERS"); SPIN_CKPT_FLAGS=(--checkpointing_steps 250 --checkpoints_total_limit 2)
else
  die "--recipe must be demo, sd15, sd21 or sdxl, not '$RECIPE'"
fi
SEED=${SEED:-0}
# Each iteration's own data order (and timesteps, noise): seed SEED + k unless given; one value = every iteration.
TRAIN_SEED=${TRAIN_SEED:-$(seq -s, "$SEED" $((SEED + ITERATIONS - 1)))}
SAMPLE_SEED=${SAMPLE_SEED:-1234}
GEN_PER_ROW=${GEN_PER_ROW:-0}      # 1: one opponent image per training row (Algorithm 1), 0: per unique caption
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-0}; ADAM8BIT=${ADAM8BIT:-0}
[[ "$GRADIENT_CHECKPOINTING" == 1 ]] && TRAIN_FLAGS+=(--gradient_checkpointing)
[[ "$ADAM8BIT" == 1 ]] && TRAIN_FLAGS+=(--use_8bit_adam)
for name in GEN_PER_ROW GRADIENT_CHECKPOINTING ADAM8BIT; do
  [[ "${!name}" == [01] ]] || die "--${name,,} must be 0 or 1, not '${!name}'"
done
# Baselines, trained from theta_0 next to the SPIN iterations; defaults where the recipe sets none: SPIN's own.
BASELINES=${BASELINES:-none}
IFS=, read -ra baselines <<< "${BASELINES/none/}"
for b in "${baselines[@]}"; do [[ "$b" == sft || "$b" == dpo ]] || die "--baselines takes sft, dpo (comma-separated) or none, not '$b'"; done
has_baseline() { [[ ",$BASELINES," == *",$1,"* ]]; }
SFT_LR=${SFT_LR:-${LR%%,*}}; SFT_LR_SCHEDULER=${SFT_LR_SCHEDULER:-${LR_SCHEDULER%%,*}}; SFT_WARMUP=${SFT_WARMUP:-${WARMUP%%,*}}
SFT_STEPS=${SFT_STEPS:-${STEPS%%,*}}; SFT_CHECKPOINT_STEPS=${SFT_CHECKPOINT_STEPS:-0}; SFT_GRAD_ACCUM=${SFT_GRAD_ACCUM:-${GRAD_ACCUM%%,*}}
DPO_LR=${DPO_LR:-${LR%%,*}}; DPO_BETA=${DPO_BETA:-${BETA%%,*}}; DPO_STEPS=${DPO_STEPS:-${STEPS%%,*}}
DPO_LR_SCHEDULER=${DPO_LR_SCHEDULER:-${LR_SCHEDULER%%,*}}; DPO_WARMUP=${DPO_WARMUP:-${WARMUP%%,*}}
# Validation: every model (iterations, baselines, SFT checkpoints) on held-out prompts, at other seeds than the test
# samples; the best per family by VAL_METRIC's mean over prompts is recorded (and the chosen SFT is the test's).
VAL_DATASET=${VAL_DATASET:-$DATASET}; VAL_SPLIT=${VAL_SPLIT:-validation_unique}
VAL_PROMPTS=${VAL_PROMPTS:-500}; VAL_IMAGES=${VAL_IMAGES:-1}; VAL_SEED=${VAL_SEED:-4321}; VAL_METRIC=${VAL_METRIC:-pickscore}
[[ "$VAL_PROMPTS" =~ ^[0-9]+$ ]] || die "--val_prompts must be a number (0: no validation), not '$VAL_PROMPTS'"
[[ "$SFT_CHECKPOINT_STEPS" =~ ^[0-9]+$ ]] || die "--sft_checkpoint_steps must be a number (0: the final SFT only), not '$SFT_CHECKPOINT_STEPS'"
if has_baseline sft && (( SFT_CHECKPOINT_STEPS > 0 )) && [[ -n "${LORA_RANK:-}" || " $EXTRA_TRAIN_ARGS " == *" --lora_rank "* ]]; then
  die "--sft_checkpoint_steps $SFT_CHECKPOINT_STEPS with LoRA: a LoRA run's checkpoints hold only the adapter and cannot be sampled as a UNet; set --sft_checkpoint_steps 0 (the final SFT only)"
fi

# ---- per-iteration settings: one value (every iteration) or exactly ITERATIONS, comma-separated -----------------
PER_ITERATION=(GEN_IMAGES GEN_STEPS TRAIN_BATCH GRAD_ACCUM LR LR_SCHEDULER WARMUP STEPS BETA TRAIN_SEED)
for name in "${PER_ITERATION[@]}"; do
  IFS=, read -ra vals <<< "${!name}"
  if [[ ",${!name}," == *,,* || ( ${#vals[@]} -ne 1 && ${#vals[@]} -ne $ITERATIONS ) ]]; then
    hint=""; [[ "${SCHEDULE:-}" == paper && " LR BETA STEPS " == *" $name "* ]] && hint=" (SCHEDULE=paper is Appendix A.1's 3 iterations; SCHEDULE=card: one value)"
    die "--${name,,} '${!name}' has ${#vals[@]} value(s): give one (every iteration) or $ITERATIONS (one per iteration, comma-separated)$hint"
  fi
done
at() { local -a v; IFS=, read -ra v <<< "${!1}"; if [[ ${#v[@]} -eq 1 ]]; then echo "${v[0]}"; else echo "${v[$2]}"; fi; }
run() { if [[ -n "$DRY_RUN" ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi; }

if [[ "$RECIPE" == demo && -z "$DRY_RUN" ]]; then
  # shellcheck disable=SC2086
  $PYTHON toy_world.py build --output_dir "$WORLD" $WORLD_FLAGS
  if [[ ! -f "$SCORERS/evaluate_flags.txt" ]]; then $PYTHON tiny_scorers.py "$SCORERS" > /dev/null; fi
fi
if [[ "$RECIPE" == demo ]]; then
  SCORER_FLAGS=(); [[ -f "$SCORERS/evaluate_flags.txt" ]] && mapfile -t SCORER_FLAGS < "$SCORERS/evaluate_flags.txt"
  SCORER_FLAGS+=(--device cpu --mixed_precision no)
fi
SYNTHETIC_LATENT=${SYNTHETIC_LATENT:-}   # train_spin.py --synthetic_latent (image | sampler); empty: train_spin.py's default
SYN_FLAGS=(); [[ -n "$SYNTHETIC_LATENT" ]] && SYN_FLAGS=(--synthetic_latent "$SYNTHETIC_LATENT")
CACHE_FLAGS=(); [[ -n "${CACHE_DIR:-}" ]] && CACHE_FLAGS=(--cache_dir "$CACHE_DIR")
SCHED_FLAGS=(); [[ -n "$SCHEDULER" ]] && SCHED_FLAGS=(--scheduler "$SCHEDULER")
[[ -n "$DRY_RUN" ]] || mkdir -p "$RUN_DIR"
say() { printf '\n=== %s\n' "$*"; }
t_start=$(date +%s)

# ---- K iterations: theta_k generates, theta_k -> theta_{k+1} ----------------------------------------------------
unet_k=$UNET0
PER_ROW_FLAGS=(); [[ "$GEN_PER_ROW" == 1 ]] && PER_ROW_FLAGS=(--per_row)
for ((k = 0; k < ITERATIONS; k++)); do
  say "iteration $((k + 1))/$ITERATIONS: generate with theta_$k ($unet_k)"
  # shellcheck disable=SC2086
  run $LAUNCH generate.py --pretrained_model_name_or_path "$MODEL" --unet "$unet_k" \
    --dataset "$DATASET" --split "$SPLIT" "${DATA_FLAGS[@]}" "${PER_ROW_FLAGS[@]}" \
    --num_images_per_prompt "$(at GEN_IMAGES $k)" --num_inference_steps "$(at GEN_STEPS $k)" --guidance_scale "$GUIDANCE" \
    "${SCHED_FLAGS[@]}" --resolution "$RESOLUTION" --batch_size "$GEN_BATCH" --seed "$((SEED + k))" \
    --mixed_precision "$MIXED_PRECISION" --output_dir "$RUN_DIR/synth_$k" $EXTRA_GENERATE_ARGS

  say "iteration $((k + 1))/$ITERATIONS: train theta_$((k + 1)) from theta_$k against its own samples"
  # shellcheck disable=SC2086
  run $LAUNCH train_spin.py --pretrained_model_name_or_path "$MODEL" --unet "$unet_k" \
    --dataset "$DATASET" --split "$SPLIT" "${DATA_FLAGS[@]}" --synthetic_dir "$RUN_DIR/synth_$k" \
    --resolution "$RESOLUTION" --train_batch_size "$(at TRAIN_BATCH $k)" --gradient_accumulation_steps "$(at GRAD_ACCUM $k)" \
    --learning_rate "$(at LR $k)" --lr_scheduler "$(at LR_SCHEDULER $k)" --lr_warmup_steps "$(at WARMUP $k)" \
    --max_train_steps "$(at STEPS $k)" --beta "$(at BETA $k)" --seed "$(at TRAIN_SEED $k)" \
    --mixed_precision "$MIXED_PRECISION" "${SYN_FLAGS[@]}" "${TRAIN_FLAGS[@]}" "${SPIN_CKPT_FLAGS[@]}" \
    "${CACHE_FLAGS[@]}" --resume_from_checkpoint latest --output_dir "$RUN_DIR/iter_$((k + 1))" $EXTRA_TRAIN_ARGS
  unet_k=$RUN_DIR/iter_$((k + 1))
done

# ---- baselines from theta_0 on the same real data: SFT (winners) and Diffusion-DPO (winner vs loser) --------------
if has_baseline sft; then
  say "baseline: SFT from theta_0 ($SFT_STEPS steps${SFT_CHECKPOINT_STEPS:+, a checkpoint every $SFT_CHECKPOINT_STEPS})"
  # every checkpoint is kept: they are the validation's candidates (full fine-tuning: UNet + AdamW state each)
  # shellcheck disable=SC2086
  run $LAUNCH train_spin.py --loss sft --pretrained_model_name_or_path "$MODEL" --unet "$UNET0" \
    --dataset "$DATASET" --split "$SPLIT" "${DATA_FLAGS[@]}" --resolution "$RESOLUTION" \
    --train_batch_size "$(at TRAIN_BATCH 0)" --gradient_accumulation_steps "$SFT_GRAD_ACCUM" \
    --learning_rate "$SFT_LR" --lr_scheduler "$SFT_LR_SCHEDULER" --lr_warmup_steps "$SFT_WARMUP" \
    --max_train_steps "$SFT_STEPS" --seed "$SEED" --mixed_precision "$MIXED_PRECISION" "${TRAIN_FLAGS[@]}" \
    --checkpointing_steps "$(( SFT_CHECKPOINT_STEPS > 0 ? SFT_CHECKPOINT_STEPS : SFT_STEPS ))" \
    "${CACHE_FLAGS[@]}" --resume_from_checkpoint latest --output_dir "$RUN_DIR/sft" $EXTRA_TRAIN_ARGS
fi
if has_baseline dpo; then
  say "baseline: Diffusion-DPO from theta_0 (winner vs loser, theta_0 as reference, beta $DPO_BETA, $DPO_STEPS steps)"
  # shellcheck disable=SC2086
  run $LAUNCH train_spin.py --loss dpo --pretrained_model_name_or_path "$MODEL" --unet "$UNET0" \
    --dataset "$DATASET" --split "$SPLIT" "${DATA_FLAGS[@]}" --resolution "$RESOLUTION" \
    --train_batch_size "$(at TRAIN_BATCH 0)" --gradient_accumulation_steps "$(at GRAD_ACCUM 0)" \
    --learning_rate "$DPO_LR" --lr_scheduler "$DPO_LR_SCHEDULER" --lr_warmup_steps "$DPO_WARMUP" \
    --max_train_steps "$DPO_STEPS" --beta "$DPO_BETA" --seed "$SEED" --mixed_precision "$MIXED_PRECISION" \
    "${TRAIN_FLAGS[@]}" "${SPIN_CKPT_FLAGS[@]}" "${CACHE_FLAGS[@]}" --resume_from_checkpoint latest \
    --output_dir "$RUN_DIR/dpo" $EXTRA_TRAIN_ARGS
fi

# ---- validation: every candidate on held-out prompts; the best of each family is recorded ------------------------
candidates=(--unet "base=$UNET0")
for ((k = 1; k <= ITERATIONS; k++)); do candidates+=(--unet "iter_$k=$RUN_DIR/iter_$k"); done
if has_baseline sft; then
  if [[ "$SFT_CHECKPOINT_STEPS" -gt 0 ]]; then
    for ((n = SFT_CHECKPOINT_STEPS; n < SFT_STEPS; n += SFT_CHECKPOINT_STEPS)); do
      candidates+=(--unet "sft-$n=$RUN_DIR/sft/checkpoint-$n")
    done
  fi
  candidates+=(--unet "sft-$SFT_STEPS=$RUN_DIR/sft")
fi
has_baseline dpo && candidates+=(--unet "dpo=$RUN_DIR/dpo")
best_sft=$RUN_DIR/sft   # without validation: the SFT run's last step
if [[ "$VAL_PROMPTS" -gt 0 ]]; then
  say "validation: $(( ${#candidates[@]} / 2 )) models on $VAL_PROMPTS held-out prompts ($VAL_DATASET $VAL_SPLIT, seed $VAL_SEED)"
  # shellcheck disable=SC2086
  run $LAUNCH sample.py --pretrained_model_name_or_path "$MODEL" "${candidates[@]}" \
    --dataset "$VAL_DATASET" --split "$VAL_SPLIT" --max_prompts "$VAL_PROMPTS" \
    --num_images_per_prompt "$VAL_IMAGES" --num_inference_steps "$SAMPLE_STEPS" --guidance_scale "$GUIDANCE" \
    "${SCHED_FLAGS[@]}" --resolution "$RESOLUTION" --seed "$VAL_SEED" --mixed_precision "$MIXED_PRECISION" \
    --output_dir "$RUN_DIR/val_samples" $EXTRA_SAMPLE_ARGS
  # shellcheck disable=SC2086
  run $PYTHON evaluate.py "$RUN_DIR/val_samples" --output_dir "$RUN_DIR/val_eval" "${SCORER_FLAGS[@]}" $EXTRA_EVALUATE_ARGS
  if [[ -z "$DRY_RUN" ]]; then
    best_sft=$($PYTHON - "$RUN_DIR" "$VAL_METRIC" "${candidates[@]}" <<'PY'
import json, os, sys
from pathlib import Path

run, metric, specs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:][1::2]
paths = dict(s.split("=", 1) for s in specs)
summary = json.loads((run / "val_eval" / "summary.json").read_text())
table = summary["summary"]
if metric not in summary.get("metrics", []):
    sys.exit(f"error: --val_metric {metric} was not scored (evaluate.py scored {summary.get('metrics')})")
# the mean over prompts of each prompt's mean score: every image counts, so few validation images still rank
scores = {n: table[n][metric]["mean"]["mean"] for n in paths if n in table}
unscored = sorted(n for n in paths if scores.get(n) is None)
if unscored:
    sys.exit(f"error: validation has no {metric} score for {', '.join(unscored)} (see {run / 'val_eval'}); "
             "rerun the loop to finish its samples and scores")
family = lambda n: "spin" if n.startswith("iter_") else n.split("-")[0]
best = {}
for n, s in scores.items():
    f = family(n)
    if f != "base" and (f not in best or s > scores[best[f]]):
        best[f] = n
best["overall"] = max(scores, key=scores.get)
selection = {"metric": metric, "statistic": "mean over prompts of the per-prompt mean (higher is better)",
             "scores": scores, "best": best, "unets": paths,
             "validation": {k: summary.get(k) for k in ("hps_version", "mixed_precision")}}
tmp = run / "val_eval" / f"selection.json.{os.getpid()}.tmp"
tmp.write_text(json.dumps(selection, indent=2) + "\n")
os.replace(tmp, run / "val_eval" / "selection.json")
for n, s in scores.items():
    mark = "  <- best " + ", ".join(f for f, b in best.items() if b == n) if n in best.values() else ""
    print(f"  {n:>12}  {metric} {s:.4f}{mark}", file=sys.stderr)
print(paths[best["sft"]] if "sft" in best else "")
PY
)
    has_baseline sft && [[ -z "$best_sft" ]] && die "validation chose no SFT model (see $RUN_DIR/val_eval/summary.json)"
  fi
fi

# ---- held-out samples of every model with the same seeds, then scores ------------------------------------------
say "sample theta_0$( ((${#baselines[@]})) && echo ", the baselines") and theta_1 .. theta_$ITERATIONS on held-out prompts (same seeds for every model)"
models=(--unet "base=$UNET0")
has_baseline sft && models+=(--unet "sft=$best_sft")   # the SFT checkpoint validation chose
has_baseline dpo && models+=(--unet "dpo=$RUN_DIR/dpo")
for ((k = 1; k <= ITERATIONS; k++)); do models+=(--unet "iter_$k=$RUN_DIR/iter_$k"); done
# shellcheck disable=SC2086
run $LAUNCH sample.py --pretrained_model_name_or_path "$MODEL" "${models[@]}" \
  --dataset "$TEST_DATASET" --split "$TEST_SPLIT" --max_prompts "$SAMPLE_PROMPTS" \
  --num_images_per_prompt "$SAMPLE_IMAGES" --num_inference_steps "$SAMPLE_STEPS" --guidance_scale "$GUIDANCE" \
  "${SCHED_FLAGS[@]}" --resolution "$RESOLUTION" --seed "$SAMPLE_SEED" --mixed_precision "$MIXED_PRECISION" \
  --output_dir "$RUN_DIR/samples" $EXTRA_SAMPLE_ARGS

say "evaluate"
# evaluate.py runs in one process (it does not join a multi-process launch)
# shellcheck disable=SC2086
run $PYTHON evaluate.py "$RUN_DIR/samples" --output_dir "$RUN_DIR/eval" "${SCORER_FLAGS[@]}" $EXTRA_EVALUATE_ARGS
[[ -n "$DRY_RUN" ]] && exit 0

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
if [[ -f "$RUN_DIR/val_eval/selection.json" ]]; then
  $PYTHON -c 'import json, sys; s = json.load(open(sys.argv[1])); print("validation (" + s["metric"] + ", " + s["statistic"] + "): best " + ", ".join(f"{k} {v}" for k, v in s["best"].items()))' "$RUN_DIR/val_eval/selection.json"
fi
[[ "$RECIPE" == demo ]] && echo "(demo: the four scorers are tiny RANDOM models; their numbers only show that every stage ran)"
cat "$RUN_DIR/eval/summary.md"
if [[ "$RECIPE" == demo ]]; then
  say "Frechet distance to held-out real images (image space; lower is better; the demo's meaningful number)"
  fd_args=(--unet "$UNET0"); names=(theta_0)
  for ((k = 1; k <= ITERATIONS; k++)); do fd_args+=(--unet "$RUN_DIR/iter_$k"); names+=("iter_$k"); done
  has_baseline sft && { fd_args+=(--unet "$best_sft"); names+=(sft); }
  has_baseline dpo && { fd_args+=(--unet "$RUN_DIR/dpo"); names+=(dpo); }
  $PYTHON toy_world.py fd --world "$WORLD" "${fd_args[@]}" --names "${names[@]}" --json "$RUN_DIR/eval/fd.json" \
    --plot "$RUN_DIR/eval/fd_across_iterations.png" --grid "$RUN_DIR/eval/sample_grid.png"
  plots="$RUN_DIR/eval/training_curves.png  $RUN_DIR/eval/fd_across_iterations.png  $RUN_DIR/eval/sample_grid.png"
else
  plots="$RUN_DIR/eval/training_curves.png  $RUN_DIR/eval/metrics_across_iterations.png"
fi
cat <<EOF

Where everything is:
  synthetic data   $RUN_DIR/synth_0 .. synth_$((ITERATIONS - 1))
  trained UNets    $RUN_DIR/iter_1 .. iter_$ITERATIONS  (unet/, metrics.jsonl, run_config.json: each iteration's settings)
  baselines        $( ((${#baselines[@]})) && echo "$RUN_DIR/sft (checkpoint-N: candidates), $RUN_DIR/dpo" || echo "none (BASELINES=sft,dpo)")
  validation       $RUN_DIR/val_samples/  $RUN_DIR/val_eval/selection.json  (best of each family on validation)
  samples          $RUN_DIR/samples/<model>/  and  $RUN_DIR/samples/grid.png
  scores, tables   $RUN_DIR/eval/  (summary.md, summary.json, scores.jsonl)
  plots            $plots
EOF
