# The paper's settings shared by recipes/sd15.sh and recipes/sd21.sh (arXiv 2402.10210, Appendix A.1; docs/loop.md "The
# real recipes" says which setting comes from where). Sourced after the model's own settings.
UNET0=${UNET0:-base}
DATASET=${DATASET:-yuvalkirstain/pickapic_v2}; SPLIT=${SPLIT:-train}
MAX_TRAIN_SAMPLES=${MAX_TRAIN_SAMPLES:-}     # e.g. 100000 for a first run; empty: the whole split
TEST_DATASET=${TEST_DATASET:-$DATASET}; TEST_SPLIT=${TEST_SPLIT:-test_unique}
GEN_IMAGES=${GEN_IMAGES:-1}; GEN_STEPS=${GEN_STEPS:-50}; GUIDANCE=${GUIDANCE:-7.5}; SCHEDULER=${SCHEDULER:-}
# The per-iteration lr / beta / steps: recipes/schedule_$SCHEDULE.sh (paper: Appendix A.1 as written; card: the
# model card's one recipe), or a schedule file of your own.
SCHEDULE=${SCHEDULE:-paper}
schedule_file=$RECIPES/schedule_$SCHEDULE.sh; [[ "$SCHEDULE" == */* || "$SCHEDULE" == *.sh ]] && schedule_file=$(own_file "$SCHEDULE")
[[ -f "$schedule_file" ]] || die "--schedule must be paper (Appendix A.1, per iteration), card (the model card's one recipe) or a schedule file, not '$SCHEDULE'"
# shellcheck source=/dev/null
source "$schedule_file"
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
# Pictures of every training stage at step 0, every 50 steps and at the end (validation/step-N/ in its folder)
WATCH_PROMPTS_FILE=${WATCH_PROMPTS_FILE-recipes/watch_prompts.txt}; WATCH_STEPS=${WATCH_STEPS:-50}
SCORER_FLAGS=()
DATA_FLAGS=(--streaming)
[[ -n "$MAX_TRAIN_SAMPLES" ]] && DATA_FLAGS+=(--max_train_samples "$MAX_TRAIN_SAMPLES")
TRAIN_FLAGS=(--allow_tf32 --dataloader_num_workers "$DATALOADER_WORKERS"); SPIN_CKPT_FLAGS=(--checkpointing_steps 50 --checkpoints_total_limit 2)
