# The laptop-CPU recipe: a small character-level model of tiny Shakespeare in a few minutes.
#   python prepare.py shakespeare_char
#   python train.py config/train_shakespeare_char_cpu.py
#   python sample.py --out_dir=out-shakespeare-char-cpu
# nanoGPT's published CPU settings (its README: "python train.py config/train_shakespeare_char.py
# --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
# --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0",
# val loss ~1.88) with one change: a 3x larger learning rate. Measured here on 2 CPU cores, same
# seed and steps: learning_rate 1e-3 -> best val loss 1.896, 2e-3 -> 1.800, 3e-3 -> 1.769, 5e-3 -> 1.760.

out_dir = 'out-shakespeare-char-cpu'
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False  # keep the best checkpoint only

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64  # characters of context

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # too small a model to overfit in 2000 steps

learning_rate = 3e-3  # nanoGPT: 1e-3 (see above)
max_iters = 2000
lr_decay_iters = 2000  # = max_iters
min_lr = 3e-4  # = learning_rate / 10
beta2 = 0.99
warmup_iters = 100

device = 'cpu'  # this recipe is for the CPU even on a machine with a GPU

eval_sample = 'ROMEO:'  # watch it learn: a greedy continuation at each evaluation
eval_sample_tokens = 100
