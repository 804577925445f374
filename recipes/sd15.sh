# spin_loop.sh --recipe sd15: sourced by spin_loop.sh after its flags are read. Every setting is VAR=${VAR:-default},
# so a flag or an environment variable set before wins. Copy this file and pass --recipe path/to/it.sh to make your own.
# The paper's recipe on SD-1.5 (recipes/paper_common.sh). One GPU: GRAD_ACCUM=256 gives its 2048 pairs per step with
# TRAIN_BATCH=8; 8 GPUs: LAUNCH="accelerate launch --num_processes 8" GRAD_ACCUM=32.
MODEL=${MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}; RESOLUTION=${RESOLUTION:-512}
TRAIN_BATCH=${TRAIN_BATCH:-8}; GRAD_ACCUM=${GRAD_ACCUM:-256}; GEN_BATCH=${GEN_BATCH:-16}
# Plain AdamW (the paper's) and no checkpointing fit an 80 GB card at batch 8 (docs/performance.md: counted, not measured on a GPU)
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-0}; ADAM8BIT=${ADAM8BIT:-0}
RUN_DIR=${RUN_DIR:-runs/sd15}
source "$RECIPES/paper_common.sh"
