"""
Trains a GPT. On a laptop CPU, a character-level model of Shakespeare in a few minutes:

    python prepare.py shakespeare_char
    python train.py config/train_shakespeare_char_cpu.py

The defaults below train GPT-2 124M on OpenWebText. A config file and --key=value flags
override them (configurator.py); python train.py --help lists them all. The script reads top
to bottom: settings, setup, data, model, optimizer, then the training loop.
"""

import math
import os
import time

import numpy as np
import torch

import configurator
from configurator import fail
from model import GPT, GPTConfig, autocast_context, load_checkpoint, peak_flops, pick_device, pick_dtype
from prepare import DATA_DIR, DataError, load_meta

# -----------------------------------------------------------------------------
# settings
# I/O
out_dir = 'out'  # folder for ckpt.pt
eval_interval = 2000  # iterations between evaluations (and checkpoints)
log_interval = 1  # iterations between log lines
eval_iters = 200  # batches per split in each evaluation
eval_only = False  # evaluate once, then exit
always_save_checkpoint = True  # save at every evaluation, not only when val loss improves
init_from = 'scratch'  # 'scratch' | 'resume' (from out_dir/ckpt.pt)
# wandb logging
wandb_log = False  # log to Weights & Biases (pip install wandb)
wandb_project = 'owt'  # the W&B project the run is logged under
wandb_run_name = 'gpt2'  # the run's name in that project
# data
dataset = 'openwebtext'  # data/<dataset>/, made by prepare.py
gradient_accumulation_steps = 40  # micro-batches per optimizer step
batch_size = 12  # sequences per micro-batch
block_size = 1024  # context length, in tokens
# model
n_layer = 12  # transformer blocks
n_head = 12  # attention heads
n_embd = 768  # embedding width
dropout = 0.0  # 0.0 for pretraining, 0.1+ for finetuning
bias = True  # biases in Linear and LayerNorm layers
flash = True  # True: fused attention; False: the manual masked attention, to step through
# AdamW optimizer
learning_rate = 6e-4  # peak learning rate
max_iters = 600000  # optimizer steps in total
weight_decay = 1e-1  # on 2-D weights only
beta1 = 0.9  # decay of the running mean of gradients
beta2 = 0.95  # decay of the running mean of squared gradients (0.95, not 0.999: steadier for large models)
grad_clip = 1.0  # clip the gradient norm at this value; 0.0 disables
# learning-rate schedule
decay_lr = True  # linear warmup then cosine decay; False keeps learning_rate constant
warmup_iters = 2000  # steps of linear warmup
lr_decay_iters = 600000  # step where the cosine reaches min_lr; ~max_iters (Chinchilla)
min_lr = 6e-5  # floor of the schedule; ~learning_rate / 10 (Chinchilla)
# system
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = 'auto'  # 'auto' | 'float32' | 'bfloat16' | 'float16' (float16 uses a GradScaler)
compile = False  # torch.compile the model (PyTorch 2)
seed = 1337  # seeds the initialisation, dropout and the order of batches
# -----------------------------------------------------------------------------
config = configurator.configure(globals())  # config files and --key=value flags
for name in ('eval_interval', 'log_interval', 'eval_iters', 'batch_size', 'block_size', 'gradient_accumulation_steps'):
    if config[name] < 1:
        fail(f"{name} must be at least 1, not {config[name]}")
for name in ('max_iters', 'learning_rate', 'min_lr', 'weight_decay', 'grad_clip', 'warmup_iters', 'seed'):
    if config[name] < 0:
        fail(f"{name} must not be negative, not {config[name]}")

# -----------------------------------------------------------------------------
# setup: device, precision, seeds
try:
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
except ValueError as e:
    fail(e)
config.update(device=device, dtype=dtype)  # the resolved values go into the checkpoint
device_type = device.split(':')[0]  # 'cuda' | 'mps' | 'cpu', for autocast and the optimizer
torch.manual_seed(seed)
torch.set_float32_matmul_precision('high')  # TF32 matmuls on Ampere+ GPUs; no effect on the CPU
ctx = autocast_context(device, dtype)
# float16's narrow range underflows small gradients: scale the loss up, unscale before the step.
# bfloat16 has float32's range and needs no scaler; enabled=False makes it a no-op.
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
try:
    os.makedirs(out_dir, exist_ok=True)
except OSError as e:
    fail(f"cannot create out_dir '{out_dir}' ({e.strerror}): choose another with --out_dir=PATH")
# -----------------------------------------------------------------------------
# data
data_dir = os.path.join(DATA_DIR, dataset)
try:
    meta = load_meta(data_dir)
except DataError as e:
    fail(e)
for split in ('train', 'val'):
    if not os.path.isfile(os.path.join(data_dir, f'{split}.bin')):
        fail(f"{data_dir}/{split}.bin is missing: run 'python prepare.py {dataset}' again")


def get_batch(split, stream):
    """A batch of batch_size random windows of block_size + 1 tokens: inputs x and targets y
    (x shifted by one). Which windows is a pure function of stream, a tuple of 4 ints, so the
    same stream always gives the same batch (DESIGN.md, Determinism)."""
    # a new memmap for every batch: one kept open keeps every page it has read mapped,
    # and the process grows with the file (see stackoverflow.com/questions/45132940)
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=meta['dtype'], mode='r')
    ix = np.random.default_rng(stream).integers(0, len(data) - block_size, size=batch_size)
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))  # (B, T)
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))  # (B, T)
    if device_type == 'cuda':
        # pinned host memory lets the copy to the GPU run asynchronously (non_blocking)
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# model
iter_num = 0  # optimizer steps taken so far
best_val_loss = float('inf')
# GPUs run matmuls fastest on multiples of 64: GPT-2's 50257 tokens become 50304 (the extra rows
# are never a target, so training pushes their logits down; sample.py never draws them). Below
# 4096 tokens the matmul is too small for this to matter, so small vocabularies stay exact and
# the first loss of a character model reads ln(65) = 4.17.
vocab_size = meta['vocab_size'] if meta['vocab_size'] < 4096 else 64 * math.ceil(meta['vocab_size'] / 64)
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                  vocab_size=vocab_size, bias=bias, dropout=dropout, flash=flash)
checkpoint = None
if init_from == 'scratch':
    print(f"a new model from scratch, vocab_size {vocab_size}")
    try:
        model = GPT(GPTConfig(**model_args))
    except ValueError as e:
        fail(e)
elif init_from == 'resume':
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.isfile(ckpt_path):
        fail(f"no checkpoint to resume at {ckpt_path}: train with --init_from=scratch first, or fix --out_dir")
    print(f"resuming from {ckpt_path}")
    # the architecture is the checkpoint's; dropout and the attention path may change on resume
    try:
        model, checkpoint = load_checkpoint(ckpt_path, device, dropout=dropout, flash=flash)
    except ValueError as e:
        fail(e)
    if checkpoint['model_args']['vocab_size'] != vocab_size:
        fail(f"the checkpoint's vocabulary has {checkpoint['model_args']['vocab_size']:,} tokens, data/{dataset}'s "
             f"{vocab_size:,}: resume with the dataset it was trained on (--dataset={checkpoint['config']['dataset']})")
    for k, v in checkpoint['model_args'].items():
        if k not in ('dropout', 'flash') and v != model_args[k]:
            print(f"  {k} = {v} from the checkpoint (the settings say {model_args[k]})")
    model_args = dict(checkpoint['model_args'], dropout=dropout, flash=flash)
    block_size = model_args['block_size']
    iter_num = checkpoint['iter_num']
    best_val_loss = checkpoint['best_val_loss']
    # dropout continues as if never stopped (the CPU generator's state is a CPU tensor whatever map_location)
    torch.set_rng_state(checkpoint['rng_state'].cpu())
    if device_type == 'cuda' and 'cuda_rng_state' in checkpoint:
        torch.cuda.set_rng_state(checkpoint['cuda_rng_state'].cpu())
else:
    fail(f"init_from must be 'scratch' or 'resume', not '{init_from}'")
model.to(device)
config['block_size'] = block_size  # the resolved value, as the checkpoint's config records it
print(f"{model.get_num_params() / 1e6:.2f}M parameters")
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
print(f"device {device}, dtype {dtype}; {tokens_per_iter:,} tokens per iteration "
      f"({gradient_accumulation_steps} x {batch_size} x {block_size})")
for split in ('train', 'val'):  # a window needs block_size + 1 tokens: the inputs and one more target
    n_tokens = meta[f'{split}_tokens']
    if n_tokens < block_size + 1:
        fail(f"the {split} split of '{dataset}' has {n_tokens:,} tokens, fewer than block_size + 1 = "
             f"{block_size + 1}: lower --block_size or give the split more text")

# -----------------------------------------------------------------------------
# optimizer
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])  # Adam's moments; its settings are today's:
    for group, decay in zip(optimizer.param_groups, (weight_decay, 0.0)):
        group.update(betas=(beta1, beta2), weight_decay=decay)
    if scaler.is_enabled() and checkpoint['scaler']:  # float16 on both runs: keep the loss scale it found
        scaler.load_state_dict(checkpoint['scaler'])
checkpoint = None  # free the memory the loaded tensors hold

raw_model = model  # the uncompiled module: its state_dict names have no '_orig_mod.' prefix
if compile:
    print("compiling the model (a minute or so the first time)")
    model = torch.compile(model)

peak, peak_name = peak_flops(device)
print(f"MFU is measured against the {peak_name}")
if wandb_log:
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True needs wandb: pip install wandb")
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)


@torch.no_grad()
def estimate_loss():
    """Mean loss on each split over the same eval_iters batches every time, in every run,
    whatever the seed: two evaluations, or two runs, see the same text and compare."""
    out = {}
    model.eval()  # dropout off
    for i, split in enumerate(('train', 'val')):
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split, (0, 1 + i, k, 0))  # 1, 2 in the second place: never a training stream
            with ctx:
                _, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def get_lr(it):
    """Linear warmup from learning_rate / (warmup_iters + 1) (not 0, so step 0 learns too),
    then a cosine from learning_rate down to min_lr at lr_decay_iters, then min_lr."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def save_checkpoint():
    checkpoint = {
        'model': raw_model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'scaler': scaler.state_dict(),
        'model_args': model_args,
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'config': config,
        'rng_state': torch.get_rng_state(),
    }
    if device_type == 'cuda':
        checkpoint['cuda_rng_state'] = torch.cuda.get_rng_state()
    path = os.path.join(out_dir, 'ckpt.pt')
    # write a temporary file, then rename it: a crash mid-write never leaves a broken ckpt.pt
    torch.save(checkpoint, path + '.tmp')
    os.replace(path + '.tmp', path)
    print(f"saved {path}")


# -----------------------------------------------------------------------------
# training loop
t0 = time.perf_counter()
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr

    # evaluate, log, save
    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        losses = estimate_loss()
        improved = losses['val'] < best_val_loss
        best_val_loss = min(best_val_loss, losses['val'])
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
              f" (best {best_val_loss:.4f})")
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr})
        if iter_num > 0 and not eval_only and (improved or always_save_checkpoint):
            save_checkpoint()
        t0 = time.perf_counter()  # evaluation time is not training time
    if iter_num >= max_iters or eval_only:
        break

    # one optimizer step over gradient_accumulation_steps micro-batches
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(gradient_accumulation_steps):
        X, Y = get_batch('train', (seed, 0, iter_num, micro_step))
        with ctx:
            _, loss = model(X, Y)
            loss = loss / gradient_accumulation_steps  # summed over micro-steps: the mean over the full batch
        scaler.scale(loss).backward()  # gradients add up across micro-steps
        loss_sum += loss.detach()
    if grad_clip > 0.0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # skips the step if float16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # free the gradients' memory until the next backward

    if iter_num % log_interval == 0:
        lossf = loss_sum.item()  # .item() waits for the device: only on log steps
        dt = time.perf_counter() - t0
        mfu = raw_model.estimate_mfu(tokens_per_iter, dt, peak)
        print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.4e}, {dt * 1000:.1f} ms, "
              f"{tokens_per_iter / dt:,.0f} tok/s, mfu {mfu * 100:.3g}%")
    iter_num += 1
    t0 = time.perf_counter()
