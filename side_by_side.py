"""
Side by side with nanoGPT's own code (a checkout of karpathy/nanoGPT): its scripts and ours as
whole processes, alternating, on a copy of it in a temporary folder with its shakespeare_char data
prepared by its own prepare.py; and how busy the machine's other processes kept it meanwhile (on 2
cores a busy neighbour slows every op). bench.py --nanogpt=PATH runs them.
"""

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from tokenizer import DATA_DIR

HERE = os.path.dirname(os.path.abspath(__file__))


# nanoGPT's README command for a CPU (val loss ~1.88 in ~3 minutes), after its config file
NANOGPT_CPU = ['config/train_shakespeare_char.py', '--device=cpu', '--compile=False',
               '--eval_iters=20', '--log_interval=1',
               '--block_size=64', '--batch_size=12', '--n_layer=4', '--n_head=4', '--n_embd=128',
               '--dropout=0.0']


def nanogpt_copy(nanogpt, tmp):
    """A copy of --nanogpt in tmp with its shakespeare_char prepared by its own prepare.py,
    and ours prepared."""
    if not os.path.isfile(os.path.join(nanogpt, 'train.py')):
        sys.exit(f"error: --nanogpt={nanogpt} is not a nanoGPT checkout (no train.py): git clone "
                          f"https://github.com/karpathy/nanoGPT and pass its path")
    nano = os.path.join(tmp, 'nanoGPT')
    shutil.copytree(nanogpt, nano, ignore=shutil.ignore_patterns('out*', '*.bin', '.git'))
    shutil.copy(os.path.join(DATA_DIR, 'shakespeare_char', 'input.txt'),
                os.path.join(nano, 'data', 'shakespeare_char'))
    subprocess.run([sys.executable, 'data/shakespeare_char/prepare.py'], cwd=nano, check=True,
                   capture_output=True)
    if not os.path.isfile(os.path.join(DATA_DIR, 'shakespeare_char', 'meta.json')):
        subprocess.run([sys.executable, 'prepare.py', 'shakespeare_char'], cwd=HERE, check=True,
                       capture_output=True)
    return nano


def whole_processes(commands, processes):
    """{name: [(seconds, stdout), ...]}: each (cwd, args) of commands run --processes
    times, alternating."""
    runs = {name: [] for name in commands}
    for k in range(processes):
        for name, (cwd, args) in commands.items():
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, *[a.format(k=k) for a in args]], cwd=cwd,
                               capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"{name} failed ({' '.join(args)}):\n{p.stderr[-2000:]}")
            runs[name].append((time.perf_counter() - t0, p.stdout))
    return runs


def train_processes(nanogpt, processes, speedrun='', nanogpt_iters=2000, reproduce=''):
    """nanoGPT's CPU command (its max_iters nanogpt_iters), with its train.py and with ours,
    processes of each: iterations/s (the logged ms) and whole-process time; and our train.py on
    the config file speedrun."""
    with tempfile.TemporaryDirectory(prefix='bench-nanogpt-') as tmp:
        nano = nanogpt_copy(nanogpt, tmp)
        load0 = cpu_seconds(), time.perf_counter()
        commands = {
            name: (where, ['train.py', *NANOGPT_CPU, f'--max_iters={nanogpt_iters}',
                           f'--lr_decay_iters={nanogpt_iters}',
                           f'--out_dir={tmp}/out-{name}-{{k}}'])
            for name, where in (('nanoGPT', nano), ('ours', HERE))}
        if speedrun:  # its own recipe: only the whole-process time compares
            commands['speedrun'] = (HERE, ['train.py', speedrun,
                                           f'--out_dir={tmp}/out-speedrun-{{k}}'])
        runs = whole_processes(commands, processes)
        load = others_load(*load0)
    short = f" (shortened: max_iters {nanogpt_iters})" if nanogpt_iters != 2000 else ""
    print(f"nanoGPT's CPU command{short}, whole train.py processes, {processes} of each, "
          f"alternating; torch {torch.__version__}")
    print(f"{'':<8} {'ms/iter':>8} {'iters/s':>8} {'process':>9} {'best val':>9}")
    stats = {}
    for name, rs in runs.items():
        # each logs 'iter N: loss L, ... T ms' (nanoGPT: 'time T ms'); the median skips the
        # evaluations' iterations
        ms = [statistics.median(float(m)
                                for m in re.findall(r"^iter \d+: .*?([0-9.]+) ?ms", out, re.M))
              for _, out in rs]
        vals = [min(float(v) for v in re.findall(r"val loss ([0-9.]+)", out)) for _, out in rs]
        stats[name] = statistics.median(ms), statistics.median(t for t, _ in rs)
        print(f"{name:<8} {stats[name][0]:8.2f} {1000 / stats[name][0]:8.2f} "
              f"{stats[name][1]:8.1f}s {statistics.median(vals):9.4f}")
    (a, ta), (b, tb) = stats['nanoGPT'], stats['ours']
    print(f"ours vs nanoGPT: {a / b:.2f}x the iterations/s, {tb / ta:.2f}x the whole-process time; "
          f"{load}")
    if speedrun:
        print(f"speedrun ({speedrun}) vs nanoGPT's command: {stats['speedrun'][1] / ta:.2f}x the "
              f"whole-process time")
    print(f"reproduce: {reproduce}")


def sample_processes(nanogpt, processes, new_tokens=500, reproduce=''):
    """sample.py's whole process, nanoGPT's and ours, on a baby-GPT checkpoint written
    by nanoGPT's train.py."""
    with tempfile.TemporaryDirectory(prefix='bench-nanogpt-') as tmp:
        nano = nanogpt_copy(nanogpt, tmp)
        out = os.path.join(tmp, 'out-baby')
        subprocess.run([sys.executable, 'train.py', 'config/train_shakespeare_char.py',
                        '--device=cpu', '--compile=False', '--eval_iters=1', '--max_iters=1',
                        '--eval_interval=1', '--batch_size=2', f'--out_dir={out}'],
                       cwd=nano, check=True, capture_output=True)
        size = os.path.getsize(os.path.join(out, 'ckpt.pt'))
        args = ['sample.py', f'--out_dir={out}', '--device=cpu', '--num_samples=1',
                f'--max_new_tokens={new_tokens}']
        load0 = cpu_seconds(), time.perf_counter()
        runs = whole_processes({'nanoGPT': (nano, args), 'ours': (HERE, args)}, processes)
        load = others_load(*load0)
    print(f"sample.py, whole processes, on nanoGPT's baby GPT checkpoint ({size / 2**20:.0f} MiB "
          f"with AdamW's moments), 1 sample of {new_tokens} tokens, {processes} of each, "
          f"alternating; torch {torch.__version__}")
    t = {name: statistics.median(s for s, _ in rs) for name, rs in runs.items()}
    for name, rs in runs.items():
        print(f"{name:<8} {t[name]:6.2f} s  ({', '.join(f'{s:.2f}' for s, _ in rs)})")
    print(f"ours vs nanoGPT: {t['ours'] / t['nanoGPT']:.2f}x the time; {load}")
    print(f"reproduce: {reproduce}")


def cpu_seconds():
    """(busy CPU seconds of the whole machine, of this process and its finished children) so far,
    from /proc/stat (Linux; None elsewhere).
    On 2 cores another busy process matters: torch's threads wait for each other at every op."""
    try:
        with open('/proc/stat') as f:
            # user nice system idle iowait irq softirq steal
            ticks = [int(t) for t in f.readline().split()[1:]]
    except OSError:  # macOS, Windows
        return None
    t = os.times()
    # this process's own, and its finished subprocesses' (--nanogpt's runs are the measurement,
    # not others')
    own = t.user + t.system + t.children_user + t.children_system
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf('SC_CLK_TCK'), own


def others_load(start, t0):
    """'other processes kept N% of the C cores busy meanwhile', since cpu_seconds() returned
    start at t0."""
    now = cpu_seconds()
    if now is None or start is None:
        return "the load of other processes is not measured here (no /proc/stat)"
    (machine, own), (machine0, own0) = now, start
    load = ((machine - machine0) - (own - own0)) / ((time.perf_counter() - t0) * os.cpu_count())
    return f"other processes kept {load:.0%} of the {os.cpu_count()} cores busy meanwhile"
