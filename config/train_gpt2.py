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
# tokens per optimizer step: 16 sequences x 1024 tokens x 32 micro-steps = 524,288 = 2^19, about
# 0.5M (GPT-3 paper, table 2.1, for models of this size). The 32 micro-steps are shared by all
# processes: 4 each on 8 GPUs, 2 each on 2 machines of 8 (nanoGPT's 12 x 40 = 491,520 divides by 8,
# not by 16). To choose for another count of processes: a multiple of it, with batch_size x
# block_size x it ~0.5M.
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 4 * 8

# 600,000 steps x 524,288 tokens = ~315B tokens
max_iters = 600000
lr_decay_iters = 600000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 1e-1

eval_interval = 1000
eval_iters = 200
# all of HellaSwag's validation split at each evaluation (docs/eval.md: GPT-2 124M reads 0.2955)
eval_hellaswag = 10042
log_interval = 10
checkpoint_interval = 250  # a preempted job loses at most 250 steps

compile = True  # on CUDA, torch.compile cuts the step time (nanoGPT: ~135 ms -> ~100 ms on an A100)
