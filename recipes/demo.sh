# spin_loop.sh --recipe demo: sourced by spin_loop.sh after its flags are read. Every setting is VAR=${VAR:-default},
# so a flag or an environment variable set before wins. Copy this file and pass --recipe path/to/it.sh to make your own.
# The toy world (toy_world.py, docs/toy_world.md): 12 captions of coloured shapes, 32x32 images, a tiny SD-shaped
# pipeline and a theta_0 pre-trained with train_spin.py --loss sft on a shifted distribution of the same captions. The
# scorers are tiny RANDOM models: their numbers only show the plumbing. The meaningful numbers here are the judge
# classifier's and the Frechet distances to held-out real pictures, plotted in eval/fd_across_iterations.png.
RUN_DIR=${RUN_DIR:-runs/demo}
WORLD=${WORLD:-$RUN_DIR/world}
TOY_WORLD=$WORLD                 # spin_loop.sh builds the world first and ends with its judge and FD table
# toy_world.py build flags: the competent world (theta_0 draws its captions; docs/toy_world.md), e.g. add --seed 1;
# without --competent, the first world (a frozen random VAE encoder, theta_0 pre-trained half as long)
WORLD_FLAGS=${WORLD_FLAGS:---competent}
MODEL=${MODEL:-$WORLD/pipeline}
UNET0=${UNET0:-$WORLD/theta0}
DATASET=${DATASET:-$WORLD/data/train.parquet}; SPLIT=${SPLIT:-train}
TEST_DATASET=${TEST_DATASET:-$WORLD/data/test.parquet}; TEST_SPLIT=${TEST_SPLIT:-train}
RESOLUTION=${RESOLUTION:-32}
GEN_IMAGES=${GEN_IMAGES:-32}; GEN_STEPS=${GEN_STEPS:-10}; GUIDANCE=${GUIDANCE:-7.5}; SCHEDULER=${SCHEDULER:-ddim}
GEN_BATCH=${GEN_BATCH:-64}
TRAIN_BATCH=${TRAIN_BATCH:-32}; GRAD_ACCUM=${GRAD_ACCUM:-1}; LR=${LR:-1e-4}; LR_SCHEDULER=${LR_SCHEDULER:-constant}
WARMUP=${WARMUP:-0}; STEPS=${STEPS:-100}; BETA=${BETA:-2000}; MIXED_PRECISION=${MIXED_PRECISION:-no}
# The toy world's measured choice (docs/train_spin.md, --synthetic_latent): in image space SPIN on the sampler's
# latents beat SPIN on the re-encoded images on 3 of 3 seeds, and only the former moved theta_0 at all.
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
WATCH_PROMPTS_FILE=${WATCH_PROMPTS_FILE-recipes/watch_demo.txt}; WATCH_STEPS=${WATCH_STEPS:-50}   # validation/step-N/
DATA_FLAGS=(); TRAIN_FLAGS=(); SPIN_CKPT_FLAGS=()
CACHE_DIR=${CACHE_DIR:-$RUN_DIR/cache}   # the demo keeps everything it makes under RUN_DIR
