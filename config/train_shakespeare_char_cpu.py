# The CPU speedrun: a character-level model of tiny Shakespeare to the val loss of nanoGPT's CPU
# recipe (1.88) in about a third of its time, on 2 CPU cores (docs/speed.md, "Speed on the CPU").
#   python prepare.py shakespeare_char
#   python train.py config/train_shakespeare_char_cpu.py
#   python sample.py --out_dir=out-shakespeare-char-cpu
# How it was tuned, each step measured: docs/speed.md, "How the CPU speedrun recipe was tuned".
# Its switches are Qwen3's layout, so the model exports to transformers (export_hf.py).
# On PyTorch < 2.9 (no torch.optim.Muon), the AdamW recipe before it: --optimizer=adamw
# --max_iters=750 --lr_decay_iters=750 --warmup_iters=100 (val 1.846, about twice the time).

out_dir = 'out-shakespeare-char-cpu'
eval_interval = 300  # at the start and the end only
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
swiglu = True
qk_norm = True

optimizer = 'muon'  # nanoGPT: AdamW for everything
muon_learning_rate = 0.05  # the blocks' matrices (Muon); modded-nanogpt's rate
learning_rate = 8e-3  # the rest (AdamW); nanoGPT: 1e-3
max_iters = 300  # nanoGPT: 2000
lr_decay_iters = 300  # = max_iters
min_lr = 8e-4  # = learning_rate / 10 (Muon's rate decays alike, to a tenth)
beta2 = 0.99
warmup_iters = 25

device = 'cpu'  # this recipe is for the CPU even on a machine with a GPU
dtype = 'auto'  # bfloat16 where the CPU has native bf16 matmuls, else float32 (devices.py)
# flash: 'auto' (train.py's default) is the written-out attention under CPU bf16, the faster here

eval_sample = 'ROMEO:'  # watch it learn: a continuation drawn at evaluations (train.py)
eval_sample_tokens = 100
