# SCHEDULE=card: the one recipe of the released model card (UCLA-AGI/SPIN-Diffusion-iter*), every iteration the same.
LR=${LR:-2e-5}; BETA=${BETA:-5000}; STEPS=${STEPS:-500}
