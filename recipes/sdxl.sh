# spin_loop.sh --recipe sdxl: sourced by spin_loop.sh after its flags are read. Every setting is VAR=${VAR:-default},
# so a flag or an environment variable set before wins. Copy this file and pass --recipe path/to/it.sh to make your own.
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
SFT_CHECKPOINT_STEPS=${SFT_CHECKPOINT_STEPS:-500}   # candidates for validation: a LoRA checkpoint loads as its UNet
# Pictures of every training stage at step 0, every 250 steps and at the end (validation/step-N/ in its folder)
WATCH_PROMPTS_FILE=${WATCH_PROMPTS_FILE-recipes/watch_prompts.txt}; WATCH_STEPS=${WATCH_STEPS:-250}
SCORER_FLAGS=()
DATA_FLAGS=(--streaming)
[[ -n "$MAX_TRAIN_SAMPLES" ]] && DATA_FLAGS+=(--max_train_samples "$MAX_TRAIN_SAMPLES")
TRAIN_FLAGS=(--lora_rank "$LORA_RANK" --lora_cumulative --allow_tf32 --dataloader_num_workers "$DATALOADER_WORKERS"); SPIN_CKPT_FLAGS=(--checkpointing_steps 250 --checkpoints_total_limit 2)
