# Finetune OpenAI's GPT-2 XL on tiny Shakespeare (GPT-2 BPE), on one GPU:
#   python prepare.py shakespeare
#   python train.py config/finetune_shakespeare.py
# nanoGPT reports a best val loss of ~3.2 after a few minutes on an A100. On a small GPU, or the
# CPU, use init_from='gpt2' (124M) instead. init_from may be a local Hugging Face folder.
import time

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = 'shakespeare'
wandb_run_name = 'ft-' + str(int(time.time()))

dataset = 'shakespeare'
init_from = 'gpt2-xl'  # the largest GPT-2

# only keep checkpoints that improve: the model overfits 300k tokens quickly
always_save_checkpoint = False

# 1 x 32 x 1024 = 32,768 tokens per step; the dataset has ~300k, so an epoch is ~9 steps
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# a constant, small learning rate: finetuning nudges the weights
learning_rate = 3e-5
decay_lr = False

eval_sample = 'ROMEO:'  # watch it learn: a continuation drawn at evaluations (train.py)
eval_sample_tokens = 100
