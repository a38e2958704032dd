"""
Measures what this repository exists for, and prints the command that reproduces each number
(docs/speed.md says how each mode measures, and what it measured):

    python bench.py --mode=prepare --mb=200    # prepare.py on a generated 200 MB corpus, GPT-2 BPE
    python bench.py --mode=train               # training steps/s at nanoGPT's CPU shape, many ways
    python bench.py --mode=train --shape=baby  # the same for the baby GPT (6 x 6 x 384, block 256)
    python bench.py --mode=sample              # generate() of the baby GPT, with/without KV cache
    python bench.py --mode=train --nanogpt=../nanoGPT   # whole train.py runs, ours and nanoGPT's
    python bench.py --mode=sample --nanogpt=../nanoGPT  # whole sample.py runs, ours and nanoGPT's
    python bench.py --mode=lora                # full finetuning against LoRA: memory and ms a step
    python bench.py --mode=train --shape=tiny --rounds=1 --iters=2  # a quick check (test_tools.py)

train: one model and optimizer per variant, from the same weights, taking train.py's steps on
random tokens, round-robin after a warm-up (the machine's drift hits all alike); median ms per
step and the ratio to 'plain', nanoGPT's way on a CPU (float32, no autocast, no compile). A
variant joins options with '+': bf16 (autocast), compile, fused (AdamW's fused kernel), manual
(flash=False), 1thread. sample: tokens/s of generate() as sample.py draws, in several ways.
--nanogpt=PATH (a checkout of karpathy/nanoGPT): nanoGPT's README CPU command with its train.py
and with ours, whole processes, alternating; or its sample.py and ours on one checkpoint.
lora: a GPT-2-medium-shaped model (24 x 16 x 1024, random weights: no download), each way in a
process of its own: the step's ms and the process's peak resident memory.
"""

import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

import configurator
from devices import cpu_has_bf16, pick_device
from model import GPT, GPTConfig
from side_by_side import cpu_seconds, others_load, sample_processes, train_processes
from tokenizer import DATA_DIR, gpt2_encoding

# -----------------------------------------------------------------------------
mode = 'prepare'  # 'prepare' | 'train' | 'sample' | 'lora'
seed = 1337  # seeds the generated corpus, the weights and the random tokens
# prepare
mb = 200.0  # size of the generated corpus, in megabytes
workers = 0  # prepare.py's --workers; 0 = one per core
# train and sample
shape = 'auto'  # 'cpu': nanoGPT's CPU recipe | 'baby' | 'tiny' | 'auto': cpu trains, baby samples
variants = ('plain,fused,bf16,bf16+manual,bf16+manual+fused,'  # train: '+' joins options
            'compile,1thread')
rounds = 5  # train: rounds over the variants (round-robin)
iters = 10  # train: timed steps per variant in each round
warmup = 3  # train: untimed steps per variant first (the first one compiles)
threads = 0  # torch.set_num_threads; 0 keeps torch's default, one per core
device = 'cpu'  # train and sample: 'cpu' | 'cuda' | 'cuda:1' | 'mps' | 'auto'
new_tokens = 500  # sample: tokens generated per run
ways = (  # sample: '+' joins cache (the KV cache) and bf16 (autocast, as sample.py)
    'plain,cache,bf16,bf16+cache')
repeats = 3  # sample: runs per way, interleaved
nanogpt = ''  # train, sample: a nanoGPT checkout: also time whole processes of its scripts and ours
processes = 3  # with nanogpt: runs of each whole process, alternating
speedrun = ''  # train, with nanogpt: also time our train.py on this config file (the CPU speedrun)
nanogpt_iters = 2000  # train, with nanogpt: nanoGPT's max_iters = lr_decay_iters; 2000 as published
lora_rank = 8  # lora: the adapters' rank
lora_way = ''  # lora: '' compares both ways; 'full' or 'lora' is one process's (bench.py runs it)
# -----------------------------------------------------------------------------
configurator.configure(globals())

# the shapes of nanoGPT's README command for CPUs (where config/train_shakespeare_char_cpu.py
# started; it trains at batch 16) and of config/train_shakespeare_char.py at batch 16 (its 64 would
# make a CPU step take seconds)
SHAPES = {
    'cpu': dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0),
    'baby': dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=16, dropout=0.2),
    # a check, in seconds
    'tiny': dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, dropout=0.0),
}


def tree_rss(pid):
    """Resident memory (bytes) of a process and all its descendants, from /proc (Linux)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f'/proc/{p}/status') as f:
                total += next(int(line.split()[1]) * 1024 for line in f
                              if line.startswith('VmRSS:'))
            for task in os.listdir(f'/proc/{p}/task'):
                with open(f'/proc/{p}/task/{task}/children') as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass  # the process ended meanwhile
    return total


def bench_prepare():
    with open(os.path.join(DATA_DIR, 'shakespeare_char', 'input.txt'), encoding='utf-8') as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix='bench-prepare-')
    corpus = os.path.join(tmp, 'corpus.txt')
    size, sample = 0, []
    with open(corpus, 'w', encoding='utf-8') as f:
        while size < mb * 1e6:
            doc = '\n'.join(rng.choice(lines) for _ in range(rng.randint(5, 60)))
            f.write(doc + '\n<|endoftext|>\n')
            size += len(doc) + 15
            if len(sample) < 20000:  # ~4 MB of the same documents for the single-core rate
                sample.append(doc)

    # the limit: tiktoken on one core, the same kind of text, in this process
    enc = gpt2_encoding()
    rates = []
    # the median of 5 passes over ~4 MB: this machine's speed drifts from second to second
    for _ in range(5):
        t0 = time.perf_counter()
        n = sum(len(enc.encode_ordinary(doc)) + 1 for doc in sample)
        rates.append(n / (time.perf_counter() - t0))
    single = sorted(rates)[2]

    name = '_bench_prepare'
    cmd = [sys.executable, 'prepare.py', name, f'--input={corpus}', '--separator=<|endoftext|>',
           f'--workers={workers}']
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.abspath(__file__)),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = 0
    while p.poll() is None:
        peak = max(peak, tree_rss(p.pid))
        time.sleep(0.05)
    dt = time.perf_counter() - t0
    out = p.stdout.read()
    shutil.rmtree(tmp)
    shutil.rmtree(os.path.join(DATA_DIR, name), ignore_errors=True)
    if p.returncode != 0:
        sys.exit(f"prepare.py failed:\n{out}")
    last = out.strip().splitlines()[-1]
    tokens = sum(int(last.split(f)[0].split()[-1].replace(',', ''))
                 for f in (' train and', ' val tokens'))
    cores = int(last.split(' on ')[1].split()[0])

    print(f"\nprepare.py, GPT-2 BPE, {size / 1e6:,.3g} MB corpus, {tokens:,} tokens, "
          f"{cores} process(es):")
    print(f"  end to end (read, encode, write):  {tokens / dt / 1e6:6.2f} M tokens/s  ({dt:.1f} s)")
    print(f"  encode_ordinary on one core:       {single / 1e6:6.2f} M tokens/s  (median of 5; "
          f"{min(rates) / 1e6:.2f} to {max(rates) / 1e6:.2f})")
    print(f"  share of the limit ({cores} x one core): {tokens / dt / (cores * single):6.0%}")
    print(f"  peak resident memory, all processes: {peak / 2**20:,.0f} MiB")
    print(f"reproduce: python bench.py --mode=prepare --mb={mb:g} --workers={workers}")


def synchronize():
    """Wait for the device's queued work, so that a time measures it (CUDA and
    MPS run asynchronously)."""
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    elif device == 'mps':
        torch.mps.synchronize()


def make_model(s, flash=True):
    """A GPT of shape s (a SHAPES entry) at its seeded initialisation,
    vocab 65 as shakespeare_char."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=s['n_layer'], n_head=s['n_head'], n_embd=s['n_embd'],
                         block_size=s['block_size'], vocab_size=65, dropout=s['dropout'], bias=True,
                         flash=flash)).to(device)


def bench_train(s):
    names = [v for v in variants.split(',') if v]
    for name in names:
        unknown = set(name.split('+')) - {'plain', 'bf16', 'compile', 'fused', 'manual', '1thread'}
        if unknown:
            configurator.fail(f"unknown option {sorted(unknown)[0]!r} in variant '{name}': "
                              f"join plain, bf16, compile, fused, manual, 1thread with '+'")
    B, T = s['batch_size'], s['block_size']
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 65, (B, T + 1), generator=g) for _ in range(8)]
    # (B, T) inputs, targets
    batches = [(xy[:, :-1].contiguous().to(device), xy[:, 1:].contiguous().to(device))
               for xy in seqs]
    n_threads = torch.get_num_threads()  # the default, or --threads
    runs = {}
    for name in names:
        opts = set(name.split('+'))
        model = make_model(s, flash='manual' not in opts)
        model.train()
        # configure_optimizers' groups (weight decay on matrices only); 'fused' is what it returns;
        # the plain way is nanoGPT's on a CPU: AdamW's loop over the tensors, one at a time
        groups = [{'params': g['params'], 'weight_decay': g['weight_decay']}
                  for g in model.configure_optimizers(0.1, 1e-3, (0.9, 0.99),
                                                      device.split(':')[0]).param_groups]
        opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), fused='fused' in opts,
                                foreach=False)
        ctx = torch.autocast(device, torch.bfloat16) if 'bf16' in opts else nullcontext()
        fwd = torch.compile(model) if 'compile' in opts else model
        runs[name] = dict(model=model, fwd=fwd, opt=opt, ctx=ctx, opts=opts, times=[], losses=[])

    def step(r, i):
        """One train.py step (gradient_accumulation_steps=1, grad_clip=1.0); returns seconds."""
        torch.set_num_threads(1 if '1thread' in r['opts'] else n_threads)
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        with r['ctx']:
            _, loss = r['fwd'](x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(r['model'].parameters(), 1.0)
        r['opt'].step()
        r['opt'].zero_grad(set_to_none=True)
        r['losses'].append(loss.item())  # waits for the step, as train.py's log line does
        return time.perf_counter() - t0

    print(f"training steps, shape '{s['name']}': {s['n_layer']} layers x {s['n_head']} heads x "
          f"{s['n_embd']}, block {T}, batch {B}, dropout {s['dropout']}, "
          f"{runs[names[0]]['model'].get_num_params() / 1e6:.2f}M parameters; "
          f"torch {torch.__version__}, {n_threads} threads, device {device}")
    # warm-up; the first step of a compiled model includes compiling it
    for name, r in runs.items():
        r['first'] = step(r, 0)
        for i in range(1, warmup):
            step(r, i)
    load0 = cpu_seconds(), time.perf_counter()
    for k in range(rounds):
        for r in runs.values():
            r['times'] += [step(r, warmup + k * iters + i) for i in range(iters)]
    torch.set_num_threads(n_threads)
    load = others_load(*load0)

    base = statistics.median(runs[names[0]]['times'])
    flops = runs[names[0]]['model'].flops_per_token() * B * T
    w = max(len(name) for name in names)
    print(f"{'variant':<{w}} {'ms/iter':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'vs ' + names[0]:>9} "
          f"{'first step':>11} {'last loss':>10}")
    for name, r in runs.items():
        dt = statistics.median(r['times'])
        print(f"{name:<{w}} {dt * 1e3:8.1f} {B * T / dt:9,.0f} {flops / dt / 1e9:8.1f} "
              f"{base / dt:8.2f}x {r['first']:10.1f}s {r['losses'][-1]:10.4f}")
    print(f"medians of {rounds} x {iters} steps each, round-robin; {load}. 'first step' includes "
          f"compiling, shorter when inductor's on-disk cache holds the graph: "
          f"TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 times a cold compile")
    print(f"reproduce: python bench.py --mode=train --shape={s['name']} --variants={variants} "
          f"--rounds={rounds} --iters={iters} --warmup={warmup} --threads={threads} "
          f"--device={device}")


def bench_sample(s):
    model = make_model(s)
    model.eval()  # no dropout
    T = s['block_size']
    lengths = [(T - 1, 'within the context'), (new_tokens, f'{new_tokens} new tokens')]
    names = [w for w in ways.split(',') if w]
    for name in names:
        if set(name.split('+')) - {'plain', 'cache', 'bf16'}:
            configurator.fail(f"unknown way '{name}': join plain, cache, bf16 with '+'")
    times = {(n, w): [] for n, _ in lengths for w in names}
    outs = {}
    # a one-token prompt, as sample.py's default "\n"
    idx = torch.zeros((1, 1), dtype=torch.long, device=device)
    model.generate(idx, 8)  # warm-up
    load0 = cpu_seconds(), time.perf_counter()
    for _ in range(repeats):
        for n, w in times:
            torch.manual_seed(seed)
            ctx = torch.autocast(device, torch.bfloat16) if 'bf16' in w else nullcontext()
            t0 = time.perf_counter()
            with ctx:  # for the whole call, as sample.py does
                outs[n, w] = model.generate(idx, n, temperature=0.8, top_k=200,
                                            use_cache='cache' in w)
            synchronize()
            times[n, w].append(time.perf_counter() - t0)

    print(f"generate(), shape '{s['name']}': {s['n_layer']} layers x {s['n_head']} heads x "
          f"{s['n_embd']}, block_size {T}, batch 1, one-token prompt; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'new tokens':<28} {'way':<12} {'tokens/s':>9} {'vs first':>9} "
          f"{'same tokens as first':>21}")
    for n, label in lengths:
        base = statistics.median(times[n, names[0]])
        for w in names:
            t = statistics.median(times[n, w])
            same = 'yes' if torch.equal(outs[n, w], outs[n, names[0]]) else 'no'
            print(f"{n:>4} ({label + ')':<22} {w:<12} {n / t:9,.1f} {base / t:8.2f}x {same:>21}")
    print(f"medians of {repeats} interleaved runs each, ratios to '{names[0]}'; past block_size "
          f"every way runs a full forward per token; {others_load(*load0)}")
    print(f"reproduce: python bench.py --mode=sample --shape={s['name']} --new_tokens={new_tokens} "
          f"--repeats={repeats} --ways={ways} --threads={threads} --device={device}")


def lora_step():
    """One process's way (lora_way): 1 + iters steps of batch 2 x 256 on a GPT-2-medium shape;
    prints the median ms a step and the peak resident memory (VmHWM), in bytes."""
    from lora import add_lora, store_frozen
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=24, n_head=16, n_embd=1024, block_size=256, vocab_size=50304))
    half = cpu_has_bf16()  # as train.py: bf16 autocast where the CPU has it
    if lora_way == 'lora':  # the base frozen (no gradients, no Adam state), in bf16 as train.py
        add_lora(model, lora_rank, 2 * lora_rank)
        if half:
            store_frozen(model, torch.bfloat16)
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), 'cpu')
    x, y = (torch.randint(0, 50304, (2, 256)) for _ in range(2))
    ctx = torch.autocast('cpu', torch.bfloat16) if half else nullcontext()
    times = []
    for _ in range(1 + iters):
        t = time.perf_counter()
        with ctx:
            _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - t) * 1000)
    with open('/proc/self/status') as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))
    print(statistics.median(times[1:]), peak)


def bench_lora():
    """Full finetuning against LoRA, each in fresh processes, --processes of each, alternating."""
    runs = {way: [] for way in ('full', 'lora')}
    for _ in range(processes):
        for way in runs:
            p = subprocess.run([sys.executable, __file__, '--mode=lora', f'--lora_way={way}',
                                f'--iters={iters}', f'--lora_rank={lora_rank}', f'--seed={seed}'],
                               capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"the {way} process failed:\n{p.stderr[-2000:]}")
            runs[way].append(tuple(map(float, p.stdout.split()[-2:])))
    (ms, peak), (lora_ms, lora_peak) = [[statistics.median(r[i] for r in rs) for i in (0, 1)]
                                        for rs in runs.values()]
    print(f"GPT-2 medium's shape (24 x 16 x 1024, random weights), batch 2 x 256, "
          f"torch {torch.__version__}: full finetuning {ms:,.0f} ms a step, "
          f"peak {peak / 1e9:.2f} GB; "
          f"LoRA rank {lora_rank} {lora_ms:,.0f} ms, peak {lora_peak / 1e9:.2f} GB: "
          f"{lora_peak / peak:.2f}x the memory, {lora_ms / ms:.2f}x the time")
    print(f"reproduce: python bench.py --mode=lora --processes={processes} --iters={iters} "
          f"--lora_rank={lora_rank}")


if mode == 'prepare':
    bench_prepare()
elif mode == 'lora':
    lora_step() if lora_way else bench_lora()
elif mode in ('train', 'sample'):
    try:
        device = pick_device(device)
    except ValueError as e:
        configurator.fail(e)
    if threads > 0:
        torch.set_num_threads(threads)
    name = shape if shape != 'auto' else {'train': 'cpu', 'sample': 'baby'}[mode]
    if name not in SHAPES:
        configurator.fail(f"shape must be 'auto', 'cpu', 'baby' or 'tiny', not '{shape}'")
    # --variants= (or --ways=) with --nanogpt: the processes only
    if variants if mode == 'train' else ways:
        (bench_train if mode == 'train' else bench_sample)(dict(SHAPES[name], name=name))
    if nanogpt:
        common = f"--nanogpt={nanogpt} --processes={processes}"
        if mode == 'train':
            extra = f' --speedrun={speedrun}' if speedrun else ''
            extra += f' --nanogpt_iters={nanogpt_iters}' if nanogpt_iters != 2000 else ''
            train_processes(nanogpt, processes, speedrun, nanogpt_iters, f"python bench.py "
                            f"--mode=train --variants={variants} {common}{extra}")
        else:
            extra = f' --new_tokens={new_tokens}' if new_tokens != 500 else ''
            sample_processes(nanogpt, processes, new_tokens, f"python bench.py --mode=sample "
                             f"--ways={ways} {common}{extra}")
else:
    configurator.fail(f"mode must be 'prepare', 'train', 'sample' or 'lora', not '{mode}'")
