# A modern small GPT for TinyStories (Eldan & Li 2023) in GPT-2's BPE, on one GPU:
#   python prepare.py tinystories
#   python train.py config/train_tinystories_modern.py
#   python sample.py --out_dir=out-tinystories-modern --start="Once upon a time"
# NOT MEASURED: TinyStories is not on the machine this recipe was written on (no GPU either), so
# the settings below are reasoned, not tuned, and no loss is claimed for them. The architecture is
# the one measured on shakespeare_char (config/train_shakespeare_char_modern.py): rotary positions,
# RMSNorm, SwiGLU, grouped-query attention, QK-norm, no biases (each cited in model.py).
# Size: 8 blocks of ~2.85M weights (c_attn 512 x 1024 with 4 key/value heads of 64, c_proj 512 x
# 512, SwiGLU hidden 64 * round(8 * 512 / 3 / 64) = 1344) = ~22.8M, plus the tied 50304 x 512
# embedding (25.8M): ~48.6M in all, the size range of the TinyStories paper's larger models.
# Tokens: 32 x 512 x 4 = 65,536 per step, 10,000 steps = 655M, about one pass over TinyStoriesV2.

out_dir = 'out-tinystories-modern'
eval_interval = 500
eval_iters = 100
log_interval = 10
always_save_checkpoint = False  # keep the best checkpoint only

dataset = 'tinystories'  # prepare.py: GPT-2 BPE, stories separated by <|endoftext|>
gradient_accumulation_steps = 4
batch_size = 32
block_size = 512  # tokens of context: most stories fit

n_layer = 8
n_head = 8  # head size 64
n_embd = 512
n_kv_head = 4  # two query heads per key/value head: half the KV cache
rope = True
rmsnorm = True
swiglu = True
qk_norm = True
bias = False
dropout = 0.0  # about one pass over the data: nothing to overfit

learning_rate = 1e-3  # QK-norm keeps the attention logits bounded at this rate
max_iters = 10000
lr_decay_iters = 10000  # = max_iters
min_lr = 1e-4  # = learning_rate / 10
beta2 = 0.95
warmup_iters = 500
weight_decay = 0.1

eval_sample = 'Once upon a time'  # watch it learn: a continuation drawn at evaluations (train.py)
eval_sample_tokens = 100
