# The CPU speedrun: a character-level model of tiny Shakespeare to the val loss of nanoGPT's CPU
# recipe (1.88) in about a third of its time, on 2 CPU cores (README, "Speed on the CPU").
#   python prepare.py shakespeare_char
#   python train.py config/train_shakespeare_char_cpu.py
#   python sample.py --out_dir=out-shakespeare-char-cpu
# The start: nanoGPT's published CPU settings (its README: "python train.py config/train_shakespeare_char.py
# --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
# --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0", val ~1.88;
# 1.896 in this repository). What was tuned, each measured here (best val loss, seed 1337):
#   precision: bf16 autocast (dtype 'auto' on CPUs with native bf16) with the written-out attention
#     (flash=False; PyTorch's CPU bf16 flash backward is slow), fused AdamW: 1.6x float32's steps/s (bench.py)
#   learning rate, 2,000 steps: 1e-3 -> 1.896, 2e-3 -> 1.800, 3e-3 -> 1.769, 5e-3 -> 1.760
#   fewer steps, 1,000: 3e-3 -> 1.925, 5e-3 -> 1.921; with rope, rmsnorm and qk_norm (no biases) -> 1.852
#   then batch 16 and 8e-3 (qk_norm keeps the higher rate stable): 700 steps -> 1.871, 750 -> 1.846
#   then Muon (optimizer='muon', PyTorch 2.9+) for the blocks' matrices, AdamW at 8e-3 for the rest
#   (a step costs 77-82 ms instead of 56: Newton-Schulz on 16 small matrices), 250 steps unless said:
#     muon_learning_rate 0.02, 500 steps -> 1.748; 0.05, 500 -> 1.744; 0.05: 350 -> 1.801, 300 -> 1.839,
#     250 -> 1.857, 220 -> 1.905; 0.08 -> 1.868; AdamW part at 1.2e-2 -> 1.874; warmup 10 -> 1.857;
#     batch 24, 170 steps -> 1.891; without qk_norm -> 1.938; without rmsnorm and qk_norm -> 1.945;
#     without rope, rmsnorm and qk_norm -> 2.032
#   since the written-out attention scales and masks inside one baddbmm (model.py: one bf16 rounding of
#     the scores where there were two), train.py's whole process: 250 -> 1.865 (19.5 s), 270 -> 1.852
#     (22.1 s), 300 -> 1.830 (25.2 s)
#   since each batch's windows are drawn by batches.draw (issue 14: another order of the same data), seed
#     1337: 250 -> 1.900, 270 -> 1.881, 280 -> 1.865, 300 -> 1.849; seeds 1, 2, 3 at 280: 1.842, 1.878, 1.892
#     (mean of the four 1.869), at 300: 1.823, 1.853, 1.881. So 280: the spread between seeds is +-0.025
# On PyTorch < 2.9 (no torch.optim.Muon), the AdamW recipe before it: --optimizer=adamw --max_iters=750
# --lr_decay_iters=750 --warmup_iters=100 (val 1.846, about twice the time).
# Same shape as nanoGPT's: 4 layers, 4 heads, 128 wide, 64 characters of context.

out_dir = 'out-shakespeare-char-cpu'
eval_interval = 280  # at the start and the end only
eval_iters = 20
log_interval = 50
always_save_checkpoint = False  # keep the best checkpoint only

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 16  # nanoGPT: 12
block_size = 64  # characters of context

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # too small a model, and too few steps, to overfit
bias = False  # LayerNorm and Linear biases: none (Llama-style), with the switches below
rope = True  # rotary positions instead of learned ones
rmsnorm = True
qk_norm = True

optimizer = 'muon'  # nanoGPT: AdamW for everything (see above)
muon_learning_rate = 0.05  # the blocks' matrices (Muon); modded-nanogpt's rate
learning_rate = 8e-3  # the rest (AdamW); nanoGPT: 1e-3 (see above)
max_iters = 280  # nanoGPT: 2000
lr_decay_iters = 280  # = max_iters
min_lr = 8e-4  # = learning_rate / 10 (Muon's rate decays alike, to a tenth)
beta2 = 0.99
warmup_iters = 25

device = 'cpu'  # this recipe is for the CPU even on a machine with a GPU
dtype = 'auto'  # bfloat16 where the CPU has native bf16 matmuls, else float32 (model.py, pick_dtype)
# flash: 'auto' (train.py's default) is the written-out attention under CPU bf16, as measured above

eval_sample = 'ROMEO:'  # watch it learn: a continuation drawn at evaluations (train.py, watch_interval)
eval_sample_tokens = 100
