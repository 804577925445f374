# SCHEDULE=paper: the paper's per-iteration settings (arXiv 2402.10210, Appendix A.1), reproduced as written:
# iteration 1's 50 steps end inside the 200-step warm-up, at a quarter of its lr. One value per iteration.
LR=${LR:-2e-5,2e-5,5e-8}; BETA=${BETA:-2000,5000,5000}; STEPS=${STEPS:-50,500,200}
