"""
Trains a GPT. On a laptop CPU, a character-level model of Shakespeare in under a minute; on 8 GPUs
of one machine, GPT-2 (docs/distributed.md for several machines):

    python prepare.py shakespeare_char && python train.py config/train_shakespeare_char_cpu.py
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

The defaults below train GPT-2 124M on OpenWebText, overridden by a config file and --key=value
flags (configurator.py; --help lists them). It reads top to bottom: settings, processes and device,
data, model, optimizer, the loop's helpers, the loop; a call into a module names its file.
"""

import dataclasses
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

import batches
import checkpoint
import configurator
import devices
import memory
import scoring
import tokenizer
from dpo import Preferences
from lora import adapt, store_frozen
from model import GPT, GPTConfig
from muon import make_optimizer
from plot import RunLog

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
eval_sample = ''  # a prompt whose continuation is printed at evaluations ('' = none)
eval_sample_tokens = 200  # tokens of that continuation
eval_sample_temperature = 0.8  # drawn with top_k 200 from seed, the same draw each time; 0: greedy
eval_hellaswag = 0  # HellaSwag items scored at evaluations (GPT-2 BPE data): 0 = off, 10042 = all
plot = True  # write out_dir/loss.png at evaluations (pip install matplotlib); log.jsonl always
watch_interval = 30  # seconds: the plot and the sample at an evaluation at most this often
init_from = 'scratch'  # 'scratch' | 'resume' | 'gpt2'..'gpt2-xl' | a Hugging Face folder | FILE.pt
# wandb logging
wandb_log = False  # log to Weights & Biases (pip install wandb)
wandb_project = 'owt'  # the W&B project the run is logged under
wandb_run_name = 'gpt2'  # the run's name in that project
# data
dataset = 'openwebtext'  # data/<dataset>/, made by prepare.py (of conversations: the replies learn)
gradient_accumulation_steps = 40  # micro-batches per optimizer step, over all processes together
batch_size = 12  # sequences per micro-batch
block_size = 1024  # context length, in tokens
# model
n_layer = 12  # transformer blocks
n_head = 12  # attention heads
n_embd = 768  # embedding width
dropout = 0.0  # 0.0 for pretraining, 0.1+ for finetuning
bias = True  # biases in Linear and LayerNorm layers
flash = 'auto'  # True: fused attention; False: written out, to step through; 'auto': the faster
rope = False  # rotary position embeddings (RoFormer) instead of learned ones (model.py cites each)
rmsnorm = False  # RMSNorm instead of LayerNorm
swiglu = False  # SwiGLU MLP instead of GELU, about the same parameter count
n_kv_head = 0  # key/value heads, grouped-query attention: 0 = n_head, 1 = multi-query
qk_norm = False  # RMS-normalise each head's queries and keys
# optimizer
optimizer = 'adamw'  # 'adamw' | 'muon': Muon for the blocks' matrices, AdamW for the rest (muon.py)
muon_learning_rate = 0.02  # Muon's peak learning rate (Keller Jordan's write-up, nanochat)
learning_rate = 6e-4  # peak learning rate (AdamW's)
max_iters = 600000  # optimizer steps in total
weight_decay = 1e-1  # on 2-D weights only
beta1 = 0.9  # decay of the running mean of gradients
beta2 = 0.95  # decay of the running mean of squared gradients (0.95: steadier for large models)
grad_clip = 1.0  # clip the gradient norm at this value; 0.0 disables
# learning-rate schedule
decay_lr = True  # linear warmup then cosine decay; False keeps learning_rate constant
warmup_iters = 2000  # steps of linear warmup
lr_decay_iters = 600000  # step where the cosine reaches min_lr; ~max_iters (Chinchilla)
min_lr = 6e-5  # floor of the schedule; ~learning_rate / 10 (Chinchilla)
# system
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps' (under torchrun: a GPU per process)
dtype = 'auto'  # 'auto' | 'float32' | 'bfloat16' | 'float16' (float16 uses a GradScaler)
compile = 'auto'  # torch.compile the model: 'auto' (on CUDA only) | True | False
fsdp = False  # under torchrun: shard weights, gradients and optimizer state (FSDP2), not copy (DDP)
seed = 1337  # seeds the initialisation, dropout and the order of batches
# finetuning with adapters (lora.py): the model init_from names stays frozen
lora_rank = 0  # LoRA adapters of this rank on each block's matrices; 0: off (all weights learn)
lora_alpha = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = 'c_attn,c_proj,c_fc'  # the Linear layers of each block that get adapters
dpo_beta = 0.0  # > 0: DPO on a dataset of preference pairs (dpo.py): how far from the reference
# -----------------------------------------------------------------------------
config = configurator.configure(globals())  # config files and --key=value flags

# -----------------------------------------------------------------------------
# processes, device, precision
ddp = 'RANK' in os.environ  # torchrun starts one process per GPU (or CPU worker), each its RANK
rank = int(os.environ.get('RANK', 0))
world = int(os.environ.get('WORLD_SIZE', 1))
master = rank == 0  # the one process that logs and writes checkpoints
sharded = ddp and fsdp  # FSDP2: each process holds a shard of weights, gradients, optimizer state
fail = configurator.fail if master else lambda msg: configurator.fail(f"(rank {rank}) {msg}")
log = print if master else lambda *args, **kwargs: None
configurator.check_ranges(config, ('eval_interval', 'log_interval', 'eval_iters', 'batch_size',
                                   'block_size', 'gradient_accumulation_steps'),  # at least 1
                          ('max_iters', 'learning_rate', 'min_lr', 'weight_decay', 'grad_clip',
                           'warmup_iters', 'seed', 'checkpoint_interval', 'lora_rank', 'dpo_beta'))
if gradient_accumulation_steps % world:  # the micro-batches of a step are shared out evenly
    fail(f"gradient_accumulation_steps {gradient_accumulation_steps} is not divisible by the "
         f"{world} processes: make it a multiple of {world} (the nearest: "
         f"{world * max(1, round(gradient_accumulation_steps / world))})")
micro_steps = gradient_accumulation_steps // world  # this process's share of each step
if sharded and optimizer == 'muon':
    fail("optimizer='muon' orthogonalises each whole weight matrix, but FSDP keeps only a shard "
         "of it on each process: use DDP (fsdp=False) or optimizer='adamw'")
if lora_rank and (init_from == 'scratch' or sharded or optimizer != 'adamw'):
    fail(f"lora_rank={lora_rank} adapts a trained model with AdamW, on one process or under DDP: "
         f"give --init_from (a checkpoint, gpt2..gpt2-xl or a Hugging Face folder), "
         f"--optimizer=adamw and --fsdp=False (now init_from={init_from!r}, "
         f"optimizer={optimizer!r}, fsdp={fsdp})")
try:  # each 'auto' becomes this machine's choice; under torchrun each process takes its own GPU
    local_rank = int(os.environ['LOCAL_RANK']) if ddp else None
    device, dtype, compile, flash = devices.resolve(device, dtype, compile, flash, local_rank)
except ValueError as e:
    fail(e)
if ddp:  # NCCL between GPUs; Gloo between CPU processes (how the tests run it) and on Windows
    dist.init_process_group(backend='nccl' if device.startswith('cuda') and
                            dist.is_nccl_available() else 'gloo')
config.update(device=device, dtype=dtype, compile=compile, flash=flash)  # resolved, for checkpoints
device_type = device.split(':')[0]  # 'cuda' | 'mps' | 'cpu', for autocast and the optimizer
torch.manual_seed(seed)  # the same on every process: the same initial weights everywhere
torch.set_float32_matmul_precision('high')  # TF32 matmuls on Ampere+ GPUs; no effect on the CPU
# mixed precision: matmuls in bfloat16 or float16, while weights and optimizer stay in float32
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type, getattr(torch, dtype))
try:  # one run per out_dir, which must be writable: found now, not when the first save is due
    checkpoint.hold_out_dir(out_dir, master, device, ddp, log)
except ValueError as e:
    fail(e)

# -----------------------------------------------------------------------------
# data
try:  # meta.json whole, each .bin as long as it says, and the tokenizer the data was made with
    meta, tok = tokenizer.load_dataset(dataset)
    if eval_hellaswag and meta['tokenizer']['type'] != 'gpt2':
        fail(f"eval_hellaswag needs data in GPT-2's BPE, but data/{dataset} is tokenized as "
             f"'{meta['tokenizer']['type']}' (eval.py --task=hellaswag scores any model)")
    hellaswag = scoring.HellaSwag(tok, eval_hellaswag) if eval_hellaswag else None  # read it now
    sample_ids = tok.encode(eval_sample) if eval_sample else []
    wandb = tokenizer.need('wandb', 'wandb') if wandb_log and master else None  # or say it now
except ValueError as e:
    fail(e)
token_bytes = torch.tensor(tok.token_bytes(), device=device)  # UTF-8 bytes per id: bits per byte
if bool(dpo_beta) != ('train_pairs' in meta):  # preference pairs train with DPO, and only they
    fail(f"data/{dataset} is {'a' if 'train_pairs' in meta else 'no'} dataset of preference pairs, "
         f"and dpo_beta = {dpo_beta}: DPO (dpo_beta > 0, 0.1 say) trains on pairs of 'chosen' and "
         f"'rejected' replies, prepared with a chat template (prepare.py, docs/finetune.md)")
data = batches.Batches(dataset, meta)  # the files opened once, now that they were found whole


def get_batch(split, stream):
    """Inputs x and targets y (x shifted by one), (B, T) each, of stream's windows (batches.py)."""
    try:
        return data.get(split, stream, batch_size, block_size, device)
    except ValueError as e:  # a data file cut short while the run reads it
        fail(e)


# -----------------------------------------------------------------------------
# model: a new one, this run's own resumed, or another's weights to finetune
# GPUs run matmuls fastest on multiples of 64: GPT-2's 50257 tokens become 50304 (the extra rows are
# never a target; sample.py never draws them). Small vocabularies stay exact (ln 65 at the start)
vocab_size = meta['vocab_size'] if meta['vocab_size'] < 4096 else \
    64 * math.ceil(meta['vocab_size'] / 64)
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                  vocab_size=vocab_size, bias=bias, dropout=dropout, flash=flash, rope=rope,
                  rmsnorm=rmsnorm, swiglu=swiglu, n_kv_head=n_kv_head, qk_norm=qk_norm)
oom_args = (batch_size, dtype, gradient_accumulation_steps, world, device)  # memory.py
iter_num, best_val_loss, ckpt, lora = 0, float('inf'), None, None  # steps, best val loss
try:
    # out of memory from here on: one line saying where, the estimate and the fix (memory.py)
    sys.excepthook = memory.exit_on_oom(GPTConfig(**model_args), *oom_args)  # ValueError: shapes
    if init_from == 'scratch':
        log(f"a new model from scratch, vocab_size {vocab_size}")
        model = GPT(GPTConfig(**model_args))
    elif init_from == 'resume':  # this run's last state: weights, iteration, optimizer, randomness
        # FSDP shards from the CPU; on the CPU the file is read, not mapped (training writes it)
        model, ckpt = checkpoint.resume_checkpoint(
            out_dir, 'cpu' if sharded else device, model_args, (vocab_size, meta['vocab_size']),
            config, mmap=sharded or device_type != 'cpu', log=log)
        iter_num, best_val_loss = ckpt['iter_num'], float(ckpt['best_val_loss'])
        lora = ckpt.get('lora')  # a LoRA run's base and adapters (checkpoint.py)
    else:  # another run's checkpoint (FILE.pt), GPT-2's weights, or a Hugging Face folder
        log(f"initialising from {init_from} (its weights and shape; iteration 0, a new optimizer)")
        model, base_tok, _ = checkpoint.load_model(init_from, 'cpu', dropout=dropout, flash=flash)
        if block_size < model.config.block_size:
            model.crop_block_size(block_size)  # GPT-2 has 1024 positions; fewer train faster
        known = checkpoint.fit_vocab(model, base_tok, tok, meta, vocab_size, log)  # new ids' rows
        if lora_rank:  # LoRA: the weights frozen, adapters and new ids' rows learn (lora.py)
            lora = adapt(model, init_from, lora_rank, lora_alpha, lora_dropout, lora_targets, known)
except (ValueError, ImportError) as e:
    fail(e)
if not sharded:  # FSDP moves each block to the GPU as it shards it
    model.to(device)
if lora and dtype != 'float32':  # frozen matrices in their matmuls' precision: half the memory
    store_frozen(model, getattr(torch, dtype))
model_args = dataclasses.asdict(model.config)  # the model's own shape, for its checkpoints
block_size = config['block_size'] = model.config.block_size  # a checkpoint's, GPT-2's
sys.excepthook = memory.exit_on_oom(model.config, *oom_args)  # the model's own shape from here on
log(f"{model.get_num_params() / 1e6:.2f}M parameters")
log(memory.memory_report(model.config, *oom_args))
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
log(f"device {device}, dtype {dtype}, flash={flash}, {world} process(es); {tokens_per_iter:,} "
    f"tokens per iteration ({gradient_accumulation_steps} x {batch_size} x {block_size})")
for split in ('train', 'val'):  # a window needs block_size + 1 tokens: the inputs and one target
    if meta[f'{split}_tokens'] < block_size + 1:
        fail(f"the {split} split of '{dataset}' has {meta[f'{split}_tokens']:,} tokens, fewer than "
             f"block_size + 1 = {block_size + 1}: lower --block_size or give the split more text")

raw_model = model  # the plain module: its state_dict names have no '_orig_mod.' or 'module.'
if sharded:  # FSDP2: each block's weights split over the processes, gathered just before it runs
    from torch.distributed.fsdp import fully_shard
    for block in raw_model.transformer.h:
        fully_shard(block)
    fully_shard(raw_model)
if compile:  # after fully_shard, so that its hooks are compiled with the model
    log("compiling the model (a minute or so the first time)")
    first = get_batch('train', batches.train_stream(seed, 0, 0))
    model = devices.compile_checked(model, first, ctx, log)
if ddp and not sharded:  # DDP: each process holds the whole model; gradients are averaged
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)

# -----------------------------------------------------------------------------
# optimizer and gradient scaler
try:  # the setting optimizer ('adamw' | 'muon') becomes the optimizer (not fused under FSDP and
    # float16: the sharded scaler's flag breaks AdamW's fused kernel)
    fused = not (sharded and dtype == 'float16')
    optimizer = make_optimizer(raw_model, weight_decay, learning_rate, (beta1, beta2), device_type,
                               optimizer, muon_learning_rate, fused=fused)
except ValueError as e:
    fail(e)
# float16's narrow range underflows small gradients: the scaler scales the loss up and unscales the
# gradients before the step; for any other dtype it does nothing. FSDP's agrees across processes
if sharded:
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    scaler = ShardedGradScaler(device_type, enabled=dtype == 'float16')
else:
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
prefs = Preferences(data, dpo_beta, batch_size, block_size) if dpo_beta else None
try:  # a resumed run's Adam moments (and Muon's), float16's loss scale; DPO's reference, the
    # model this run started from as it was then (its log-probabilities: dpo.py)
    if ckpt is not None:
        checkpoint.resume_optimizer(ckpt, config, raw_model, optimizer, scaler, sharded, log)
    if prefs:
        prefs.reference(raw_model, ctx, device, ckpt, log)
except ValueError as e:
    fail(e)
ckpt = None  # free the memory the loaded tensors hold


# -----------------------------------------------------------------------------
# helpers of the training loop: checkpoints, evaluation, the schedule
def save(names):
    """The run's state to out_dir/<name> for each of names, whole (every process: FSDP gathers)."""
    state = dict(model_args=model_args, scaler=scaler.state_dict(), iter_num=iter_num,
                 best_val_loss=best_val_loss, config=config, rng_state=torch.get_rng_state(),
                 **(dict(lora=lora) if lora else {}),
                 **(dict(dpo_reference=prefs.logps) if prefs else {}))
    seconds = checkpoint.save_run(raw_model, optimizer, state, names, out_dir, sharded, master,
                                  device, ddp)
    log(f"saved {', '.join(names)} at iteration {iter_num} ({seconds:.1f} s)" + ("; under torchrun "
        "a preempted run has 30 s to save: see docs/devices.md" if seconds > 10 else ""))


@torch.no_grad()
def estimate_loss():
    """Mean loss over every target and bits per byte (DPO: its loss, margin and pair accuracy) of
    each split on the same eval_iters batches in every run (batches.eval_stream), whatever the seed
    or the processes: each process takes every world-th batch and the sums are added up."""
    out = {}
    model.eval()  # dropout off
    rounds = math.ceil(eval_iters / world)  # every process runs as many forwards (FSDP needs it)
    for split in ('train', 'val'):
        sums = torch.zeros(4, device=device)  # loss, targets, the text's loss, its bytes (DPO: 4)
        for k in range(rank, rounds * world, world):
            stream = batches.eval_stream(split, min(k, eval_iters - 1))
            X, Y = get_batch(split, stream)
            with ctx:
                logits, nll = model(X, Y, reduction='none')
            if k >= eval_iters:  # a repeat, which keeps the processes in step: not counted
                continue
            sums += (prefs.sums(nll, split, stream) if prefs else
                     scoring.score_sums(logits, Y, token_bytes))
        if ddp:
            dist.all_reduce(sums)
        if prefs:
            loss_sum, pairs, margin, right = sums.tolist()
            out.update({split: loss_sum / pairs, f'{split}_margin': margin / pairs,
                        f'{split}_accuracy': right / pairs})
        else:
            loss_sum, n_targets, text_loss, n_bytes = sums.tolist()
            out[split] = loss_sum / max(n_targets, 1)
            out[f'{split}_bpb'] = scoring.bits_per_byte(text_loss, n_bytes)
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
# training loop
peak, peak_name = devices.peak_flops(device)
log(f"MFU is measured against the {peak_name}" if peak else f"MFU not shown: {peak_name}")
if wandb:
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)
run_log = RunLog(out_dir, resume_at=iter_num if init_from == 'resume' else 0, plot=plot) \
    if master else None  # out_dir/log.jsonl, which plot.py draws
stop = devices.StopSignals(log)  # stop.name: 'SIGTERM' or 'SIGINT' once one asks the run to stop
t0 = watched_at = time.perf_counter()
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_scale']  # Muon's groups at their own peak (muon.py)

    # evaluate, log, save
    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        losses = estimate_loss()
        if not all(map(math.isfinite, losses.values())):
            fail(f"the evaluation at iteration {iter_num} gave loss {losses}: stopping; the "
                 f"checkpoints on disk are from before (lower learning_rate, or use bfloat16)")
        improved = losses['val'] < best_val_loss
        best_val_loss = min(best_val_loss, losses['val'])
        scores = {k: v for k, v in losses.items() if k not in ('train', 'val')}  # bpb, DPO's
        if hellaswag:  # raw_model: one compiled graph per item length would recompile
            _, scores['hellaswag_acc'], scores['hellaswag_acc_norm'] = hellaswag.score(
                raw_model, device, ctx, rank, world)
        shown = ''.join(f", {k.replace('_', ' ', 1)} {v:.4f}" for k, v in scores.items()
                        if k != 'hellaswag_acc')  # train bpb, val bpb; DPO's; HellaSwag's
        log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
            f"(best {best_val_loss:.4f}){shown}")
        # the plot and the sample are for a person watching: not more often than watch_interval
        watch = (eval_only or iter_num >= max_iters
                 or time.perf_counter() - watched_at >= watch_interval)
        watched_at = time.perf_counter() if watch else watched_at
        if master:
            run_log.record(iter=iter_num, tokens=iter_num * tokens_per_iter,
                           train_loss=losses['train'], val_loss=losses['val'], **scores, plot=watch)
        if sample_ids and watch:  # a generator of its own: the same draw each time, and the run's
            generator = torch.Generator(device=device).manual_seed(seed)  # random state as it was
            with torch.no_grad(), ctx:
                y = raw_model.eval().generate(torch.tensor([sample_ids], device=device),
                                              eval_sample_tokens, eval_sample_temperature, 200,
                                              meta['vocab_size'], generator=generator)
            raw_model.train()
            log(f"sample: {tok.decode(y[0].tolist())!r}")
        if wandb:
            wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'],
                       'lr': lr, **{k.replace('_', '/', 1): v for k, v in scores.items()}})
        if iter_num > 0 and not eval_only:  # last.pt at every save, so that it is the latest
            save(['last.pt'] + (['ckpt.pt'] if improved or always_save_checkpoint else []))
        t0 = time.perf_counter()  # evaluation time is not training time
    if iter_num >= max_iters or eval_only:
        break

    # one optimizer step: gradient_accumulation_steps micro-batches in all, micro_steps of them
    # here, this process's being the global micro-steps rank * micro_steps ... (batches.py)
    steps = [rank * micro_steps + m for m in range(micro_steps)]
    micro_batches = [get_batch('train', batches.train_stream(seed, iter_num, m)) for m in steps]
    # the step's loss is the mean over all its targets (chat data masks some; DPO: over its pairs)
    n_targets = torch.tensor(float(gradient_accumulation_steps * batch_size), device=device) if \
        prefs else sum((Y >= 0).sum() for _, Y in micro_batches).float()
    if ddp and not prefs:
        dist.all_reduce(n_targets)
    loss_sum = torch.zeros((), device=device)
    for m, (X, Y) in zip(steps, micro_batches):
        if dropout > 0.0:  # its own masks: the same whatever the processes, and after a resume
            torch.manual_seed(batches.step_seed(seed, iter_num, m))
        last = m == steps[-1]  # gradients are averaged over the processes in the last backward only
        if sharded:
            raw_model.set_requires_gradient_sync(last)
        elif ddp:
            model.require_backward_grad_sync = last
        with ctx:
            if prefs:  # DPO: the pairs' replies, against the reference's (dpo.py)
                _, nll = model(X, Y, reduction='none')
                loss = prefs.sums(nll, 'train', batches.train_stream(seed, iter_num, m))[0]
            else:
                _, loss = model(X, Y, reduction='sum')  # summed: a batch without targets adds 0
            loss = loss * world / n_targets.clamp(min=1)  # * world: DDP and FSDP average processes
        scaler.scale(loss).backward()  # gradients add up over micro-steps (and processes, at last)
        loss_sum += loss.detach()
    # one exchange per step: the loss, and whether a signal asked any process to stop
    exchange = torch.stack([loss_sum, torch.tensor(float(stop.name is not None), device=device)])
    if ddp:
        dist.all_reduce(exchange)
    lossf, signalled = exchange[0].item() / world, exchange[1].item() > 0  # a sync with the device
    if not math.isfinite(lossf):  # stop before the step can carry the NaN into the weights
        why = f" (float16: the GradScaler's scale was {scaler.get_scale():g})" \
            if scaler.is_enabled() else ""
        fail(f"loss is {lossf} at iteration {iter_num}{why}: stopping without saving; the "
             f"checkpoints on disk are from before (lower learning_rate, or use bfloat16 instead "
             f"of float16)")
    # these weights have just given a finite loss: save them now if a checkpoint is due or a signal
    # asks to stop (before their update, which the resumed run makes): none reach the disk unchecked
    if signalled or (checkpoint_interval and iter_num % checkpoint_interval == 0
                     and iter_num % eval_interval):
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
        mfu = raw_model.estimate_mfu(tokens_per_iter, dt, peak * world) if peak else None
        log(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.4e}, {dt * 1000:.1f} ms, "
            f"{tokens_per_iter / dt:,.0f} tok/s" + (f", mfu {mfu * 100:.3g}%" if mfu else ""))
        if master:
            run_log.record(iter=iter_num, tokens=(iter_num + 1) * tokens_per_iter, lr=lr,
                           loss=lossf, ms=dt * 1000)
    iter_num += 1
    t0 = time.perf_counter()

if ddp:  # every process leaves together, after the master's last save
    dist.barrier()
    dist.destroy_process_group()
