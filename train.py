"""
Trains a GPT. On a laptop CPU, a character-level model of Shakespeare in a few minutes:

    python prepare.py shakespeare_char
    python train.py config/train_shakespeare_char_cpu.py

On 8 GPUs of one machine, or on 2 machines of 8 (see the README for multi-node launches):

    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

The defaults below train GPT-2 124M on OpenWebText. A config file and --key=value flags
override them (configurator.py); python train.py --help lists them all. The script reads top
to bottom: settings, setup, data, model, optimizer, the loop's helpers, then the training loop.
"""

import contextlib
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import configurator
from batches import Batches, step_seed
from checkpoint import (CheckpointError, full_state, hold_out_dir, resume_optimizer, save_checkpoint, shapes_only,
                        split_model_args, train_model)
from devices import (StopSignals, autocast_context, check_accumulation, compile_checked, device_memory,
                     end_processes, estimate_memory, exit_on_oom, fail_together, fork_rng, grad_scaler,
                     keep_freed_memory, memory_report, peak_flops, pick_backend, pick_compile, pick_device, pick_dtype,
                     pick_flash, shard, use_device, without_fused)
from model import GPT, GPTConfig
from muon import make_optimizer
from plot import RunLog
from scoring import bits_per_byte, hellaswag_counts, hellaswag_file, read_hellaswag, render_hellaswag, score_sums
from tokenizer import DATA_DIR, DataError, check_bins, load_meta, load_tokenizer

# -----------------------------------------------------------------------------
# settings
# I/O
out_dir = 'out'  # folder for ckpt.pt (the best model) and last.pt (the latest state)
eval_interval = 2000  # iterations between evaluations (and saves of ckpt.pt)
log_interval = 1  # iterations between log lines
eval_iters = 200  # batches per split in each evaluation
eval_only = False  # evaluate once, then exit
always_save_checkpoint = True  # save ckpt.pt at every evaluation, not only when val loss improves
checkpoint_interval = 0  # iterations between saves of last.pt; 0: at every evaluation
eval_sample = ''  # a prompt whose continuation is printed at each evaluation ('' = none), to watch learning
eval_sample_tokens = 200  # tokens of that continuation
eval_sample_temperature = 0.8  # drawn (top_k 200, from seed; the run's random state is left as it was); 0: greedy
eval_hellaswag = 0  # HellaSwag items scored at each evaluation (GPT-2 BPE data only): 0 = off, 10042 = all
plot = True  # write out_dir/loss.png at each evaluation (pip install matplotlib); every line goes to log.jsonl
watch_interval = 30  # seconds: the plot and the sample at an evaluation at most this often (and at the last)
init_from = 'scratch'  # 'scratch' | 'resume' (out_dir's last.pt, else ckpt.pt) | 'gpt2'..'gpt2-xl' | HF folder | FILE.pt
# wandb logging
wandb_log = False  # log to Weights & Biases (pip install wandb)
wandb_project = 'owt'  # the W&B project the run is logged under
wandb_run_name = 'gpt2'  # the run's name in that project
# data
dataset = 'openwebtext'  # data/<dataset>/, made by prepare.py (of conversations: assistant tokens are targets)
gradient_accumulation_steps = 40  # micro-batches per optimizer step, over all processes together
batch_size = 12  # sequences per micro-batch
block_size = 1024  # context length, in tokens
# model
n_layer = 12  # transformer blocks
n_head = 12  # attention heads
n_embd = 768  # embedding width
dropout = 0.0  # 0.0 for pretraining, 0.1+ for finetuning
bias = True  # biases in Linear and LayerNorm layers
flash = 'auto'  # True: fused attention; False: the manual masked attention, to step through; 'auto': the faster (devices.pick_flash)
rope = False  # rotary position embeddings (RoFormer) instead of learned ones (model.py cites each paper)
rmsnorm = False  # RMSNorm instead of LayerNorm
swiglu = False  # SwiGLU MLP instead of GELU, about the same parameter count
n_kv_head = 0  # key/value heads, grouped-query attention: 0 = n_head (plain), 1 = multi-query
qk_norm = False  # RMS-normalise each head's queries and keys
# optimizer
optimizer = 'adamw'  # 'adamw' | 'muon': Muon for the blocks' weight matrices, AdamW for the rest (muon.py)
muon_learning_rate = 0.02  # Muon's peak learning rate (Keller Jordan's write-up, nanochat); the schedule scales it too
learning_rate = 6e-4  # peak learning rate (AdamW's)
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
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps' (under torchrun: each process its own GPU)
dtype = 'auto'  # 'auto' | 'float32' | 'bfloat16' | 'float16' (float16 uses a GradScaler)
compile = 'auto'  # torch.compile the model: 'auto' (on CUDA only; on a CPU 1.01-1.06x, after 7-50 s) | True | False
fsdp = False  # under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of copying them (DDP)
seed = 1337  # seeds the initialisation, dropout and the order of batches
# -----------------------------------------------------------------------------
config = configurator.configure(globals())  # config files and --key=value flags

# -----------------------------------------------------------------------------
# setup: processes, device, precision, seeds
ddp = 'RANK' in os.environ  # torchrun starts one process per GPU (or CPU worker) and tells each its RANK and WORLD_SIZE
rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) if ddp else (0, 0, 1)
master = rank == 0  # the one process that logs and writes checkpoints
fail = configurator.fail if master else (lambda message: configurator.fail(f"(rank {rank}) {message}"))
log = print if master else (lambda *args, **kwargs: None)
for name in ('eval_interval', 'log_interval', 'eval_iters', 'batch_size', 'block_size', 'gradient_accumulation_steps'):
    if config[name] < 1:
        fail(f"{name} must be at least 1, not {config[name]}")
for name in ('max_iters', 'learning_rate', 'min_lr', 'weight_decay', 'grad_clip', 'warmup_iters', 'seed',
             'checkpoint_interval'):
    if config[name] < 0:
        fail(f"{name} must not be negative, not {config[name]}")
micro_steps = gradient_accumulation_steps // world  # this process's share of each optimizer step
if ddp and fsdp and optimizer == 'muon':
    fail("optimizer='muon' orthogonalises each whole weight matrix, but FSDP keeps only a shard of it on each "
         "process: use DDP (fsdp=False) or optimizer='adamw'")
try:
    check_accumulation(gradient_accumulation_steps, world)
    device = use_device(pick_device(device), local_rank if ddp else None)  # under torchrun, each process its GPU
    dtype = pick_dtype(dtype, device)  # for this GPU (use_device made it current)
    compile = pick_compile(compile, device)
    flash = pick_flash(flash, device, dtype)
except ValueError as e:
    fail(e)
if ddp:  # NCCL between GPUs (Gloo on Windows); Gloo between CPU processes (which is how the tests run this path)
    dist.init_process_group(backend=pick_backend(device))
config.update(device=device, dtype=dtype, compile=compile, flash=flash)  # the resolved values go into the checkpoint
device_type = device.split(':')[0]  # 'cuda' | 'mps' | 'cpu', for autocast and the optimizer
torch.manual_seed(seed)  # the same on every process: the same initial weights everywhere
torch.set_float32_matmul_precision('high')  # TF32 matmuls on Ampere+ GPUs; no effect on the CPU
keep_freed_memory()  # each step's tensors reuse the last one's memory: ~2 page faults a step, not 150-2500
ctx = autocast_context(device, dtype)
try:  # one run per out_dir, which must be writable: found now, rather than when the first checkpoint is due
    lock = hold_out_dir(out_dir, master, device, ddp, log)  # checkpoint.py
except ValueError as e:
    fail(e)

# -----------------------------------------------------------------------------
# data
data_dir = os.path.join(DATA_DIR, dataset)
try:  # meta.json whole, and each .bin as long as it says (a chat dataset's masks and starts too)
    meta = load_meta(data_dir)
    check_bins(data_dir, meta)
    tok = load_tokenizer(meta, data_dir)
    token_bytes = torch.tensor(tok.token_bytes(), device=device)  # UTF-8 bytes per id, for bits per byte
    if eval_hellaswag and meta['tokenizer']['type'] != 'gpt2':
        fail(f"eval_hellaswag needs data in GPT-2's BPE, but data/{dataset} is tokenized as "
             f"'{meta['tokenizer']['type']}' (eval.py --task=hellaswag scores any model)")
    hellaswag = read_hellaswag(hellaswag_file(), eval_hellaswag) if eval_hellaswag > 0 else []  # now, not later
except DataError as e:
    fail(e)
chat = 'chat' in meta  # conversations: a mask of the targets and the conversations' starts beside the ids
if eval_sample:
    try:  # now, not at the first evaluation
        sample_ids = tok.encode(eval_sample)
    except DataError as e:
        fail(f"eval_sample: {e}")


corpus = Batches(data_dir, meta)  # the files opened once, now that check_bins found them whole


def get_batch(split, stream):
    """A batch of batch_size random windows of block_size + 1 tokens: inputs x and targets y (x shifted by one).
    Which windows is a pure function of stream, a tuple of 4 ints (DESIGN.md, Determinism; batches.py)."""
    try:
        rows, targets = corpus.rows(split, stream, batch_size, block_size)  # (B, T + 1), (B, T)
    except ValueError as e:
        fail(e)
    # copied out of the rows, contiguous: the loss flattens the targets with view(-1), which a strided slice refuses
    x = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))  # (B, T)
    y = torch.from_numpy(np.ascontiguousarray(targets))  # (B, T): x shifted by one
    if device_type == 'cuda':  # pinned host memory lets the copy to the GPU run asynchronously (non_blocking)
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# model
iter_num, best_val_loss = 0, float('inf')  # optimizer steps taken so far; the lowest val loss yet
memory, stage = device_memory(device), 'building the model'  # bytes this process may use; where it is, for oom_where


def oom_where():
    """Where the run is (stage) and what a step needs, for an out-of-memory error (exit_on_oom)."""
    with shapes_only():  # the model's shape, without its memory (nor torch._dynamo's: this process is out of it)
        return stage, estimate_memory(GPT(GPTConfig(**model_args)), batch_size, dtype)


sys.excepthook = exit_on_oom(oom_where, device, memory, batch_size, gradient_accumulation_steps, world)
# GPUs run matmuls fastest on multiples of 64: GPT-2's 50257 tokens become 50304 (the extra rows are never
# a target, so training pushes their logits down; sample.py never draws them). Below 4096 tokens the matmul
# is too small for this to matter: small vocabularies stay exact, a character model's first loss is ln(65) = 4.17.
vocab_size = meta['vocab_size'] if meta['vocab_size'] < 4096 else 64 * math.ceil(meta['vocab_size'] / 64)
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                  vocab_size=vocab_size, bias=bias, dropout=dropout, flash=flash,
                  rope=rope, rmsnorm=rmsnorm, swiglu=swiglu, n_kv_head=n_kv_head, qk_norm=qk_norm)
try:  # the model init_from names, from scratch, resumed or another's weights (checkpoint.py)
    model, model_args, checkpoint = train_model(init_from, out_dir, model_args, meta, config, device, ddp and fsdp, log)
except (ValueError, ImportError) as e:
    fail(e)
if checkpoint is not None:  # resumed: the run goes on from its iteration (and its random state: train_model)
    iter_num, best_val_loss = checkpoint['iter_num'], float(checkpoint['best_val_loss'])  # nanoGPT saved a tensor
if not (ddp and fsdp):  # FSDP moves each Block to the GPU as it shards it: the whole model is never there
    model.to(device)
block_size = config['block_size'] = model.config.block_size  # resolved (a checkpoint's, GPT-2's), for the checkpoint
log(f"{model.get_num_params() / 1e6:.2f}M parameters")
log(memory_report(model, memory, batch_size, dtype, gradient_accumulation_steps, world))  # devices.py
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
log(f"device {device}, dtype {dtype}, flash={flash}, {world} process(es); {tokens_per_iter:,} tokens per iteration "
    f"({gradient_accumulation_steps} x {batch_size} x {block_size})")
for split in ('train', 'val'):  # a window needs block_size + 1 tokens: the inputs and one more target
    n_tokens = meta[f'{split}_tokens']
    if n_tokens < block_size + 1:
        fail(f"the {split} split of '{dataset}' has {n_tokens:,} tokens, fewer than block_size + 1 = "
             f"{block_size + 1}: lower --block_size or give the split more text")
hellaswag = [(*render_hellaswag(c, endings, tok, block_size), label) for _, c, endings, label in hellaswag]
if chat:
    n = np.diff(corpus.starts['train'], append=meta['train_tokens'])  # each conversation's tokens
    log(f"{len(n):,} train conversations, {(n > block_size + 1).sum():,} of them longer than block_size + 1 = "
        f"{block_size + 1} tokens: cut at the end of their row")

raw_model = model  # the plain module: its state_dict names have no '_orig_mod.' or 'module.' prefix
if ddp and fsdp:
    shard(raw_model)  # FSDP2: each process keeps 1/world of every parameter (devices.py)
if compile:  # after fully_shard, so that its hooks are compiled with the model (docs/devices.md)
    log("compiling the model (a minute or so the first time)")
    model = compile_checked(model, get_batch('train', (seed, 0, iter_num, rank * micro_steps)), ctx, device, log)
if ddp and not fsdp:  # DDP: every process holds the whole model; gradients are averaged across processes
    from torch.nn.parallel import DistributedDataParallel
    model = DistributedDataParallel(model, device_ids=[local_rank] if device_type == 'cuda' else None)

# -----------------------------------------------------------------------------
# optimizer and gradient scaler
try:  # the setting optimizer ('adamw' | 'muon', still in config) becomes the optimizer itself
    optimizer = make_optimizer(raw_model, weight_decay, learning_rate, (beta1, beta2), device_type, optimizer,
                               muon_learning_rate)
except ValueError as e:
    fail(e)
if ddp and fsdp and dtype == 'float16':  # the fused step fails with ShardedGradScaler (PyTorch issue 140514)
    optimizer = without_fused(optimizer)
scaler = grad_scaler(device_type, dtype, ddp and fsdp)  # float16's loss scaling (devices.py); else a no-op


# -----------------------------------------------------------------------------
# helpers of the training loop: checkpoints, evaluation, the schedule
def save(names):
    """Write the run's state as plain tensors to out_dir/name for each of names (under FSDP every process calls it)."""
    model_sd, optim_sd = full_state(raw_model, optimizer, ddp and fsdp)  # FSDP: gathered on the master only
    global saved_at
    error, dt = None, 0.0
    if master:
        args, arch = split_model_args(model_args)  # nanoGPT's GPTConfig keys, and ours (checkpoint.py)
        checkpoint = dict(model=model_sd, optimizer=optim_sd, scaler=scaler.state_dict(), model_args=args, arch=arch,
                          iter_num=iter_num, best_val_loss=best_val_loss, config=config, rng_state=rng_state[0])
        if device_type == 'cuda':
            checkpoint['cuda_rng_state'] = rng_state[1]
        t = time.perf_counter()
        try:
            for name in names:  # each written whole, or not at all, leaving the old one (checkpoint.py)
                save_checkpoint(checkpoint, os.path.join(out_dir, name))
                saved_at = iter_num if name == 'last.pt' else saved_at
        except CheckpointError as e:
            error = f"{e}: stopped; " + (f"last.pt of iteration {saved_at} is whole: make space and run the same "
                                         f"command with --init_from=resume" if saved_at is not None else
                                         "this run has not saved a checkpoint yet: make space and start again")
        dt = time.perf_counter() - t  # torchrun SIGKILLs 30 s after its SIGTERM: a signal's save must fit (docs/devices.md)
    fail_together(error, device, ddp)  # no process goes on without the checkpoint
    log(f"saved {', '.join(names)} at iteration {iter_num} ({dt:.1f} s)" + (
        "; under torchrun a preempted run has 30 s to save: see docs/devices.md" if dt > 10 else ""))


@torch.no_grad()
def estimate_loss():
    """Mean loss on each split over the same eval_iters batches every time, in every run,
    whatever the seed or the number of processes (each takes every world-th batch); and its bits
    per byte ('train_bpb', 'val_bpb': scoring.py)."""
    out = {}
    model.eval()  # dropout off
    rounds = math.ceil(eval_iters / world)  # every process runs as many forward passes (FSDP needs it)
    mine = range(rank, rounds * world, world)  # this process's batches; those past eval_iters repeat the last
    # batches side by side in one forward of up to 8,192 tokens (and 2**24 logits): nanoGPT's CPU command has
    # 768-token batches, too small for fast matmuls; 10 at once evaluate in half the time (issue 14). On the CPU
    # only, where it was measured, and not compiled: another shape would compile another graph
    tokens = batch_size * block_size
    group = max(1, min(8192 // tokens, 2**24 // (tokens * model_args['vocab_size'])))
    group = group if device_type == 'cpu' and not compile else 1
    for i, split in enumerate(('train', 'val')):
        total = torch.zeros(4, device=device)  # the targets' summed loss, their number; the text's loss, its bytes
        for g in range(0, rounds, group):
            ks = mine[g:g + group]
            batches = [get_batch(split, (0, 1 + i, min(k, eval_iters - 1), 0)) for k in ks]  # 1, 2: not training's
            X = torch.cat([x for x, _ in batches])  # (len(ks) * B, T)
            # a repeat's targets are -1: it runs, but is not counted
            Y = torch.cat([y if k < eval_iters else torch.full_like(y, -1) for k, (_, y) in zip(ks, batches)])
            with ctx:
                logits, _ = model(X, Y)
            # the mean over all targets, not of batch means (chat masks); bits per byte (scoring.py)
            total += score_sums(logits, Y, token_bytes)
        if ddp:
            dist.all_reduce(total)
        out[split] = total[0].item() / max(total[1].item(), 1)
        out[f'{split}_bpb'] = bits_per_byte(*total[2:].tolist())
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


# -----------------------------------------------------------------------------
# training loop: a resumed run's optimizer state, the run's logs, then the steps
if checkpoint is not None:  # Adam's moments (and Muon's), float16's loss scale; their settings are today's
    resume_optimizer(checkpoint, config, raw_model, optimizer, scaler, ddp and fsdp, log)
checkpoint = None  # free the memory the loaded tensors hold
peak, peak_name = peak_flops(device)
log(f"MFU is measured against the {peak_name}" if peak else f"MFU not shown: {peak_name}")
if wandb_log and master:
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True needs wandb: pip install wandb")
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)
saved_at = iter_num if init_from == 'resume' else None  # the iteration of this run's last.pt on disk
run_log = RunLog(out_dir, resume_at=iter_num if init_from == 'resume' else 0, plot=plot) if master else None
record = run_log.record if master else (lambda **fields: None)  # a line of out_dir/log.jsonl (plot.py draws it)
stop = StopSignals(log)  # stop.name: 'SIGTERM' or 'SIGINT' once one asks the run to stop at this step (devices.py)
t0 = watched_at = time.perf_counter()
while True:
    # the random state this iteration starts from (dropout draws from it): what a checkpoint saved during the
    # iteration holds, so that a resumed run redoes the iteration exactly
    rng_state = torch.get_rng_state(), torch.cuda.get_rng_state() if device_type == 'cuda' else None
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_scale']  # Muon's groups at their own peak (muon.py)

    # evaluate, log, save
    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        stage = 'in an evaluation'
        losses = estimate_loss()
        if not all(map(math.isfinite, losses.values())):
            fail(f"the evaluation at iteration {iter_num} gave loss {losses}: stopping; the checkpoints "
                 f"on disk are from before (lower learning_rate, or use bfloat16 instead of float16)")
        improved = losses['val'] < best_val_loss
        best_val_loss = min(best_val_loss, losses['val'])
        scores = dict(train_bpb=losses['train_bpb'], val_bpb=losses['val_bpb'])
        if hellaswag:  # raw_model: one compiled graph per item length would recompile; FSDP's hooks are on it
            n, right, right_norm = hellaswag_counts(raw_model, hellaswag, device, ctx, rank, world).tolist()
            scores.update(hellaswag_acc=right / n, hellaswag_acc_norm=right_norm / n)
        log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            f" (best {best_val_loss:.4f}), train bpb {losses['train_bpb']:.4f}, val bpb {losses['val_bpb']:.4f}"
            + (f", hellaswag acc_norm {scores['hellaswag_acc_norm']:.4f}" if hellaswag else ''))
        # the plot and the sample are for a person watching: drawing takes 0.2-2 s, a 100-token sample 0.3-1 s,
        # at every evaluation 5-10% of nanoGPT's CPU command (cProfile, issue 14); so not more often than this
        watch = eval_only or iter_num >= max_iters or time.perf_counter() - watched_at >= watch_interval
        watched_at = time.perf_counter() if watch else watched_at
        record(iter=iter_num, tokens=iter_num * tokens_per_iter, train_loss=losses['train'], val_loss=losses['val'],
               **scores, plot=watch)
        if eval_sample and watch:  # the random state is put back afterwards, so watching does not change the run
            x = torch.tensor([sample_ids], dtype=torch.long, device=device)  # (1, T)
            model.eval()
            with fork_rng(device), torch.no_grad(), ctx:
                torch.manual_seed(seed)  # the same draw at every evaluation: only the model changes the text
                y = raw_model.generate(x, eval_sample_tokens, temperature=eval_sample_temperature, top_k=200,
                                       vocab_size=meta['vocab_size'])
            model.train()
            log(f"sample: {tok.decode(y[0].tolist())!r}")
        if wandb_log and master:
            wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr,
                       **{k.replace('_', '/', 1): v for k, v in scores.items()}})
        if iter_num > 0 and not eval_only:  # last.pt at every save, so that it is always the latest
            save(['last.pt'] + (['ckpt.pt'] if improved or always_save_checkpoint else []))
        t0 = time.perf_counter()  # evaluation time is not training time
    if iter_num >= max_iters or eval_only:
        break

    # one optimizer step over gradient_accumulation_steps micro-batches, micro_steps of them here;
    # this process's are the global micro-steps rank * micro_steps ... (DESIGN.md, Determinism)
    stage, loss_sum = 'in a training step', torch.zeros((), device=device)
    batches = [get_batch('train', (seed, 0, iter_num, rank * micro_steps + m)) for m in range(micro_steps)]
    if chat:  # the step's loss is the mean over all its targets: their number over every micro-step and process first
        n_targets = sum((Y >= 0).sum() for _, Y in batches).float()
        if ddp:
            dist.all_reduce(n_targets)
        scale = world / n_targets.clamp(min=1)  # * world: DDP and FSDP average the processes' gradients
    for micro_step, (X, Y) in enumerate(batches):
        if dropout > 0.0:  # its dropout masks, likewise; without dropout nothing in a step draws (0.1 ms saved)
            torch.manual_seed(step_seed(seed, iter_num, rank * micro_steps + micro_step))
        last = micro_step == micro_steps - 1  # under DDP or FSDP, the gradients are averaged in the last backward only
        if ddp and fsdp:
            raw_model.set_requires_gradient_sync(last)
        with model.no_sync() if ddp and not fsdp and not last else contextlib.nullcontext():
            with ctx:
                if chat:  # summed, then scaled: a micro-batch with no assistant token adds 0 (never NaN)
                    _, loss = model(X, Y, reduction='sum')
                    loss = loss * scale
                else:
                    _, loss = model(X, Y)
                    loss = loss / micro_steps  # summed over micro-steps: the mean over this process's batch
            scaler.scale(loss).backward()  # gradients add up across micro-steps, and across processes at the last
        loss_sum += loss.detach()
    # one small exchange per step: the mean loss, and whether any process was signalled (all stop at the same step)
    flags = torch.stack([loss_sum, torch.tensor(float(stop.name is not None), device=device)])
    if ddp:
        dist.all_reduce(flags)
    lossf = flags[0].item() / world  # waits for the device: one sync per step, for the check below
    if not math.isfinite(lossf):  # stop before the step can carry the NaN into the weights
        what = f" (float16: the GradScaler's scale was {scaler.get_scale():g})" if scaler.is_enabled() else ""
        fail(f"loss is {lossf} at iteration {iter_num}{what}: stopping without saving; the checkpoints on "
             f"disk are from before (lower learning_rate, or use bfloat16 instead of float16)")
    # these weights have just given a finite loss: save them now if a checkpoint is due, or a signal asks to
    # stop (then before their update, which the resumed run makes): no weights reach the disk unchecked
    signalled = flags[1].item() > 0
    if signalled or (checkpoint_interval and iter_num % checkpoint_interval == 0 and iter_num % eval_interval):
        save(['last.pt'])
    if signalled:
        log(f"stopped by {stop.name or 'a signal to another process'} at iteration {iter_num}; "
            f"to continue: the same command with --init_from=resume")
        break
    if grad_clip > 0.0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # skips the step if float16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # free the gradients' memory until the next backward

    if iter_num % log_interval == 0:
        dt = time.perf_counter() - t0
        mfu = f", mfu {raw_model.estimate_mfu(tokens_per_iter, dt, peak * world) * 100:.3g}%" if peak else ""
        log(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.4e}, {dt * 1000:.1f} ms, {tokens_per_iter / dt:,.0f} tok/s{mfu}")
        record(iter=iter_num, tokens=(iter_num + 1) * tokens_per_iter, lr=lr, loss=lossf, ms=dt * 1000)
    iter_num += 1
    t0 = time.perf_counter()

end_processes(ddp)  # under torchrun together; without the interpreter's teardown (devices.py)
