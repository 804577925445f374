#!/usr/bin/env bash
# spin_loop.sh: the whole SPIN-Diffusion loop, K iterations of
#     generate.py (theta_k samples the training prompts) -> train_spin.py (theta_k -> theta_{k+1}, theta_k as reference)
# then sample.py (base and every iteration, held-out prompts, the same seeds) and evaluate.py (scores, tables, plots).
#
#   bash spin_loop.sh                 # offline demo: the toy world (no hub, no GPU), 3 iterations, minutes on 2 cores
#   bash spin_loop.sh --recipe sd15   # the paper's recipe: SD-1.5 + Pick-a-Pic v2 (GPU; docs/loop.md)
#   bash spin_loop.sh --recipe sd21   # the same on SD-2.1 (v-prediction, 768x768)
#   bash spin_loop.sh --recipe sdxl   # SDXL base at 1024x1024 with LoRA, one GPU
#   bash spin_loop.sh --recipe sd35   # SD3.5-Medium (flow matching) at 1024x1024 with LoRA (24 GB: counted)
#   bash spin_loop.sh --recipe sd15 --baselines sft,dpo   # also the paper's SFT and Diffusion-DPO (its Table 1 rows)
#   bash spin_loop.sh --recipe my_recipe.sh   # a copy of one of recipes/*.sh, edited (each recipe is one small file)
#
# Every setting is a flag (--iterations 2) or an environment variable (ITERATIONS=2); flags win. Per-iteration
# settings take one value (every iteration) or one per iteration (--beta 2000,5000,5000). Each stage's folder is
# named by iteration under RUN_DIR; re-running after an interruption resumes: finished stages are skipped by the
# scripts themselves, interrupted ones continue (generate/sample skip finished images, train_spin.py resumes from its
# latest checkpoint, evaluate.py reuses finished scores). --dry_run 1 prints the commands and runs nothing.
set -euo pipefail
CALLER_DIR=$PWD                    # a --recipe or --schedule file of your own is found from where you called
cd "$(dirname "$0")"

# ---- flags: --some_name VALUE sets SOME_NAME ---------------------------------------------------------------------
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
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
[[ "$DRY_RUN" == 0 ]] && DRY_RUN=""   # --dry_run 0: run for real
die() { echo "error: $*" >&2; exit 2; }
[[ "$ITERATIONS" =~ ^[1-9][0-9]*$ ]] || die "--iterations must be a positive integer, not '$ITERATIONS'"

# ---- the recipe: recipes/NAME.sh (or a file of your own) sets every default the loop below reads -------------------
RECIPES=recipes
own_file() { [[ "$1" == /* ]] && echo "$1" || echo "$CALLER_DIR/$1"; }
recipe_file=$RECIPES/$RECIPE.sh; [[ "$RECIPE" == */* || "$RECIPE" == *.sh ]] && recipe_file=$(own_file "$RECIPE")
[[ -f "$recipe_file" ]] || die "--recipe must be demo, sd15, sd21, sdxl, sd35 (recipes/) or a recipe file, not '$RECIPE'"
# shellcheck source=/dev/null
source "$recipe_file"
SEED=${SEED:-0}
# Each iteration's own data order (and timesteps, noise): seed SEED + k unless given; one value = every iteration.
TRAIN_SEED=${TRAIN_SEED:-$(seq -s, "$SEED" $((SEED + ITERATIONS - 1)))}
SAMPLE_SEED=${SAMPLE_SEED:-1234}
GEN_PER_ROW=${GEN_PER_ROW:-0}      # 1: one opponent image per training row (Algorithm 1), 0: per unique caption
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-0}; ADAM8BIT=${ADAM8BIT:-0}
[[ "$GRADIENT_CHECKPOINTING" == 1 ]] && TRAIN_FLAGS+=(--gradient_checkpointing)
[[ "$ADAM8BIT" == 1 ]] && TRAIN_FLAGS+=(--use_8bit_adam)
# spin_extras.py's: each model's card (evaluate.py fills its table), and a scheduler's stop signal saved as a checkpoint
TRAIN_FLAGS+=(--model_card --checkpoint_on_signal)
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

if [[ -n "${TOY_WORLD:-}" && -z "$DRY_RUN" ]]; then
  # shellcheck disable=SC2086
  $PYTHON toy_world.py build --output_dir "$WORLD" $WORLD_FLAGS
  if [[ ! -f "$SCORERS/evaluate_flags.txt" ]]; then $PYTHON tiny_scorers.py "$SCORERS" > /dev/null; fi
fi
if [[ -n "${TOY_WORLD:-}" ]]; then
  SCORER_FLAGS=(); [[ -f "$SCORERS/evaluate_flags.txt" ]] && mapfile -t SCORER_FLAGS < "$SCORERS/evaluate_flags.txt"
  SCORER_FLAGS+=(--device cpu --mixed_precision no)
fi
SYNTHETIC_LATENT=${SYNTHETIC_LATENT:-}   # train_spin.py --synthetic_latent (image | sampler); empty: train_spin.py's default
SYN_FLAGS=(); [[ -n "$SYNTHETIC_LATENT" ]] && SYN_FLAGS=(--synthetic_latent "$SYNTHETIC_LATENT")
CACHE_FLAGS=(); [[ -n "${CACHE_DIR:-}" ]] && CACHE_FLAGS=(--cache_dir "$CACHE_DIR")
# The base pipeline's hub revision (branch, tag, commit) and weights variant (e.g. fp16), for every stage
MODEL_FLAGS=(); [[ -n "${REVISION:-}" ]] && MODEL_FLAGS+=(--revision "$REVISION")
[[ -n "${VARIANT:-}" ]] && MODEL_FLAGS+=(--variant "$VARIANT")
# Watching each training stage (train_spin.py --validation_prompts_file): the policy samples these prompts at step 0,
# every WATCH_STEPS steps and at the end, with the sampling settings below, into its folder's validation/step-N/
# (and tensorboard / wandb with EXTRA_TRAIN_ARGS="--report_to tensorboard"). --watch_prompts_file "": no images.
WATCH_PROMPTS_FILE=${WATCH_PROMPTS_FILE:-}; WATCH_STEPS=${WATCH_STEPS:-100}; WATCH_IMAGES=${WATCH_IMAGES:-2}
if [[ -n "$WATCH_PROMPTS_FILE" ]]; then
  [[ -f "$WATCH_PROMPTS_FILE" ]] || WATCH_PROMPTS_FILE=$(own_file "$WATCH_PROMPTS_FILE")
  TRAIN_FLAGS+=(--validation_prompts_file "$WATCH_PROMPTS_FILE" --validation_steps "$WATCH_STEPS"
    --num_validation_images "$WATCH_IMAGES" --validation_num_inference_steps "$SAMPLE_STEPS"
    --validation_guidance_scale "$GUIDANCE" --validation_seed "$SAMPLE_SEED")
  [[ -n "$SCHEDULER" ]] && TRAIN_FLAGS+=(--validation_scheduler "$SCHEDULER")
fi
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
  run $LAUNCH generate.py --pretrained_model_name_or_path "$MODEL" "${MODEL_FLAGS[@]}" --unet "$unet_k" \
    --dataset "$DATASET" --split "$SPLIT" "${DATA_FLAGS[@]}" "${PER_ROW_FLAGS[@]}" \
    --num_images_per_prompt "$(at GEN_IMAGES $k)" --num_inference_steps "$(at GEN_STEPS $k)" --guidance_scale "$GUIDANCE" \
    "${SCHED_FLAGS[@]}" --resolution "$RESOLUTION" --batch_size "$GEN_BATCH" --seed "$((SEED + k))" \
    --mixed_precision "$MIXED_PRECISION" --output_dir "$RUN_DIR/synth_$k" $EXTRA_GENERATE_ARGS

  say "iteration $((k + 1))/$ITERATIONS: train theta_$((k + 1)) from theta_$k against its own samples"
  # shellcheck disable=SC2086
  run $LAUNCH train_spin.py --pretrained_model_name_or_path "$MODEL" "${MODEL_FLAGS[@]}" --unet "$unet_k" \
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
  run $LAUNCH train_spin.py --loss sft --pretrained_model_name_or_path "$MODEL" "${MODEL_FLAGS[@]}" --unet "$UNET0" \
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
  run $LAUNCH train_spin.py --loss dpo --pretrained_model_name_or_path "$MODEL" "${MODEL_FLAGS[@]}" --unet "$UNET0" \
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
  run $LAUNCH sample.py --pretrained_model_name_or_path "$MODEL" "${MODEL_FLAGS[@]}" "${candidates[@]}" \
    --dataset "$VAL_DATASET" --split "$VAL_SPLIT" --max_prompts "$VAL_PROMPTS" \
    --num_images_per_prompt "$VAL_IMAGES" --num_inference_steps "$SAMPLE_STEPS" --guidance_scale "$GUIDANCE" \
    "${SCHED_FLAGS[@]}" --resolution "$RESOLUTION" --seed "$VAL_SEED" --mixed_precision "$MIXED_PRECISION" \
    --output_dir "$RUN_DIR/val_samples" $EXTRA_SAMPLE_ARGS
  # shellcheck disable=SC2086
  run $PYTHON evaluate.py "$RUN_DIR/val_samples" --output_dir "$RUN_DIR/val_eval" "${SCORER_FLAGS[@]}" $EXTRA_EVALUATE_ARGS
  if [[ -z "$DRY_RUN" ]]; then
    best_sft=$($PYTHON loop_report.py select "$RUN_DIR" "$VAL_METRIC" "${candidates[@]}")
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
run $LAUNCH sample.py --pretrained_model_name_or_path "$MODEL" "${MODEL_FLAGS[@]}" "${models[@]}" \
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
$PYTHON loop_report.py plots "$RUN_DIR" "$ITERATIONS" ${TOY_WORLD:+--toy}

say "summary ($(($(date +%s) - t_start)) s)"
if [[ -f "$RUN_DIR/val_eval/selection.json" ]]; then
  $PYTHON -c 'import json, sys; s = json.load(open(sys.argv[1])); print("validation (" + s["metric"] + ", " + s["statistic"] + "): best " + ", ".join(f"{k} {v}" for k, v in s["best"].items()))' "$RUN_DIR/val_eval/selection.json"
fi
[[ -n "${TOY_WORLD:-}" ]] && echo "(demo: the four scorers are tiny RANDOM models; their numbers only show that every stage ran)"
cat "$RUN_DIR/eval/summary.md"
if [[ -n "${TOY_WORLD:-}" ]]; then
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
  trained models   $RUN_DIR/iter_1 .. iter_$ITERATIONS  (unet/ or SD3 transformer/, metrics.jsonl, run_config.json: each iteration's settings)
  model cards      $RUN_DIR/iter_1/README.md .. (evaluate.py filled in their scores)
  watching         $( [[ -n "$WATCH_PROMPTS_FILE" ]] && echo "$RUN_DIR/iter_1/validation/step-N/grid.png .. (every training stage, every $WATCH_STEPS steps)" || echo "none (WATCH_PROMPTS_FILE)")
  baselines        $( ((${#baselines[@]})) && echo "$RUN_DIR/sft (checkpoint-N: candidates), $RUN_DIR/dpo" || echo "none (BASELINES=sft,dpo)")
  validation       $RUN_DIR/val_samples/  $RUN_DIR/val_eval/selection.json  (best of each family on validation)
  samples          $RUN_DIR/samples/<model>/  and  $RUN_DIR/samples/grid.png
  scores, tables   $RUN_DIR/eval/  (summary.md, summary.json, scores.jsonl)
  plots            $plots
EOF
