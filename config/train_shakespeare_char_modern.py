# A modern small model of tiny Shakespeare for the laptop CPU, at the compute of nanoGPT's CPU
# command (the same 2000 steps of 12 x 64 characters, AdamW at learning rate 3e-3; ~0.79M
# parameters and 5.36M training FLOPs per token against its 0.80M and 5.20M):
#   python prepare.py shakespeare_char
#   python train.py config/train_shakespeare_char_modern.py
#   python sample.py --out_dir=out-shakespeare-char-modern
# The switches of model.py (each cited there): rotary positions, RMSNorm, SwiGLU, grouped-query
# attention and QK-norm, no biases, in a deeper and narrower shape (8 x 96 instead of 4 x 128):
# MobileLLM (Liu et al. 2024) found depth worth more than width for small models.
# Measured here (2 shared CPU cores, both runs at once with OMP_NUM_THREADS=1, same seed): best val
# loss 1.668 against 1.772 for nanoGPT's shape (4 x 128) with the same settings; ~500 vs ~330
# ms/iter (median, a noisy machine: 8 thinner layers are more, smaller matmuls). Variants not
# measured for lack of time.

out_dir = 'out-shakespeare-char-modern'
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False  # keep the best checkpoint only

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64  # characters of context

n_layer = 8
n_head = 6  # head size 16
n_embd = 96
n_kv_head = 2  # three query heads share each key/value head
rope = True
rmsnorm = True
swiglu = True  # hidden width 64 * round(8 * 96 / 3 / 64) = 256
qk_norm = True
bias = False
dropout = 0.0

learning_rate = 3e-3  # as the GPT-2-style CPU recipe
max_iters = 2000
lr_decay_iters = 2000  # = max_iters
min_lr = 3e-4  # = learning_rate / 10
beta2 = 0.99
warmup_iters = 100

device = 'cpu'  # this recipe is for the CPU even on a machine with a GPU

eval_sample = 'ROMEO:'  # watch it learn: a continuation drawn at evaluations (train.py)
eval_sample_tokens = 100
