# GPT-2 124M on OpenWebText, on 8 GPUs of one machine (about 4 days on 8 A100 40GB for nanoGPT):
#   python prepare.py openwebtext
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# nanoGPT reports a val loss of ~2.85 at the end; OpenAI's GPT-2 124M evaluates at ~3.11 on
# OpenWebText without finetuning (config/eval_gpt2.py), as the data differ a little.

out_dir = 'out-gpt2'
wandb_log = False  # True to follow the run on Weights & Biases
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'

dataset = 'openwebtext'
# tokens per optimizer step: 12 sequences x 1024 tokens x 40 micro-steps = 491,520, about 0.5M
# (GPT-3 paper, table 2.1, for models of this size). The 40 micro-steps are shared by all
# processes: 5 each on 8 GPUs.
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# 600,000 steps x 491,520 tokens = ~300B tokens
max_iters = 600000
lr_decay_iters = 600000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 1e-1

eval_interval = 1000
eval_iters = 200
eval_hellaswag = 10042  # all of HellaSwag's validation split at each evaluation (docs/eval.md: GPT-2 124M reads 0.2955)
log_interval = 10
checkpoint_interval = 250  # a preempted job loses at most 250 steps

compile = True  # on CUDA, torch.compile cuts the step time (nanoGPT: ~135 ms -> ~100 ms on an A100)
