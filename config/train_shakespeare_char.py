# The "baby GPT" for one GPU: a character-level model of tiny Shakespeare.
#   python prepare.py shakespeare_char
#   python train.py config/train_shakespeare_char.py
# nanoGPT reports a best val loss of about 1.47 for this recipe after ~3 minutes on an A100.

out_dir = 'out-shakespeare-char'
eval_interval = 250  # often: this small model overfits
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # keep the best checkpoint only, as it overfits

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
bias = False  # as nanoGPT trains this recipe (its train.py's default); 4-6 % faster a step on a CPU

learning_rate = 1e-3  # a small model tolerates a larger step
max_iters = 5000
lr_decay_iters = 5000  # = max_iters
min_lr = 1e-4  # = learning_rate / 10
beta2 = 0.99  # a little larger than GPT-2's 0.95: few tokens per step
warmup_iters = 100

eval_sample = 'ROMEO:'  # watch it learn: a continuation drawn at evaluations (train.py)
eval_sample_tokens = 100
