# spin_loop.sh --recipe sd35: sourced by spin_loop.sh after its flags are read. Every setting is VAR=${VAR:-default},
# so a flag or an environment variable set before wins. Copy this file and pass --recipe path/to/it.sh to make your own.
# SD3.5-Medium (flow matching, transformer/) at 1024x1024 with LoRA, for one 24 GB GPU (counted, not measured).
# Training settings from the published flow-model Diffusion-DPO run, flow_grpo's SD3.5-Medium DPO (yifan123/flow_grpo config/dpo.py and
# scripts/train_sd3_dpo.py): LoRA rank 32, alpha 64, lr 3e-4 constant, no warmup, beta 100, logit_normal(0, 1) sigma
# (train_spin.py's SD3 defaults). flow_grpo trains at 512 and online (RL-style: its own fresh samples, scored by a
# reward model), adapts also the text stream's projections (add_{q,k,v}_proj, to_add_out; LORA_TARGETS below) and
# encodes 128 T5 tokens; its lr 3e-4 is for its LoRA setting. Batch, steps and resolution are ours (the sdxl recipe's
# 16 pairs per step, 2000 steps). Sampling: SD3.5-Medium's own, guidance 4.5 and 40 steps (its model card; flow_grpo
# samples so), with the pipeline's flow-matching Euler sampler (no SCHEDULER: SD3 takes none). T5 prompt tokens:
# generate.py, train_spin.py and sample.py all default to --max_sequence_length 256 (the pipeline's default); it must
# match between them, so change it in EXTRA_GENERATE_ARGS, EXTRA_TRAIN_ARGS and EXTRA_SAMPLE_ARGS alike.
# --lora_cumulative as the sdxl recipe: every iteration also as one adapter on the base (tests/test_train_sd3.py).
# bf16, gradient checkpointing and 8-bit AdamW, for 24 GB: 5.2 GiB held for the run before activations
# (docs/performance.md; counted, not measured).
RUN_DIR=${RUN_DIR:-runs/sd35}
MODEL=${MODEL:-stabilityai/stable-diffusion-3.5-medium}
UNET0=${UNET0:-base}
DATASET=${DATASET:-yuvalkirstain/pickapic_v2}; SPLIT=${SPLIT:-train}
MAX_TRAIN_SAMPLES=${MAX_TRAIN_SAMPLES:-32000}   # 2000 steps x 16 pairs: each real row seen once per iteration
TEST_DATASET=${TEST_DATASET:-$DATASET}; TEST_SPLIT=${TEST_SPLIT:-test_unique}
RESOLUTION=${RESOLUTION:-1024}
GEN_IMAGES=${GEN_IMAGES:-1}; GEN_STEPS=${GEN_STEPS:-40}; GUIDANCE=${GUIDANCE:-4.5}; SCHEDULER=${SCHEDULER:-}
GEN_BATCH=${GEN_BATCH:-4}
TRAIN_BATCH=${TRAIN_BATCH:-4}; GRAD_ACCUM=${GRAD_ACCUM:-4}; LR=${LR:-3e-4}; LR_SCHEDULER=${LR_SCHEDULER:-constant}
WARMUP=${WARMUP:-0}; STEPS=${STEPS:-2000}; BETA=${BETA:-100}; MIXED_PRECISION=${MIXED_PRECISION:-bf16}
SAMPLE_PROMPTS=${SAMPLE_PROMPTS:-500}; SAMPLE_IMAGES=${SAMPLE_IMAGES:-5}; SAMPLE_STEPS=${SAMPLE_STEPS:-40}
LORA_RANK=${LORA_RANK:-32}; LORA_ALPHA=${LORA_ALPHA:-64}
# train_spin.py's default; flow_grpo's: attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,attn.to_k,
# attn.to_out.0,attn.to_q,attn.to_v (its attn.* names leave out the dual-attention layers' attn2)
LORA_TARGETS=${LORA_TARGETS:-to_k,to_q,to_v,to_out.0}
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-1}; ADAM8BIT=${ADAM8BIT:-1}
SFT_CHECKPOINT_STEPS=${SFT_CHECKPOINT_STEPS:-500}   # candidates for validation: a LoRA checkpoint loads as its model
# Pictures of every training stage at step 0, every 250 steps and at the end (validation/step-N/ in its folder)
WATCH_PROMPTS_FILE=${WATCH_PROMPTS_FILE-recipes/watch_prompts.txt}; WATCH_STEPS=${WATCH_STEPS:-250}
SCORER_FLAGS=()
DATA_FLAGS=(--streaming)
[[ -n "$MAX_TRAIN_SAMPLES" ]] && DATA_FLAGS+=(--max_train_samples "$MAX_TRAIN_SAMPLES")
TRAIN_FLAGS=(--lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" --lora_target_modules "$LORA_TARGETS" --lora_cumulative
  --allow_tf32 --dataloader_num_workers "$DATALOADER_WORKERS")
SPIN_CKPT_FLAGS=(--checkpointing_steps 250 --checkpoints_total_limit 2)
