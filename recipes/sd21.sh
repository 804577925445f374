# spin_loop.sh --recipe sd21: sourced by spin_loop.sh after its flags are read. Every setting is VAR=${VAR:-default},
# so a flag or an environment variable set before wins. Copy this file and pass --recipe path/to/it.sh to make your own.
# The paper's recipe (recipes/paper_common.sh) on SD-2.1: v-prediction (train_spin.py takes the velocity target from
# its scheduler) at 768x768, batch 4 x 512.
MODEL=${MODEL:-stabilityai/stable-diffusion-2-1}; RESOLUTION=${RESOLUTION:-768}
TRAIN_BATCH=${TRAIN_BATCH:-4}; GRAD_ACCUM=${GRAD_ACCUM:-512}; GEN_BATCH=${GEN_BATCH:-8}
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-1}; ADAM8BIT=${ADAM8BIT:-0}  # 768² activations: not estimated
RUN_DIR=${RUN_DIR:-runs/sd21}
source "$RECIPES/paper_common.sh"
