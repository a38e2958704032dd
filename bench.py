"""
Measures what this repository exists for, and prints the command that reproduces each number.

    python bench.py --mode=prepare --mb=200    # prepare.py on a generated 200 MB corpus, GPT-2 BPE

prepare: writes a TinyStories-format corpus (documents of tiny-Shakespeare lines separated by
<|endoftext|> lines) of --mb megabytes to a temporary folder, runs prepare.py on it as a user
would, and prints its end-to-end tokens/s (reading, encoding, writing) next to the machine's
limit: the cores it used times the rate of tiktoken's encode_ordinary on one core, on the same
text. Also the peak resident memory of prepare.py and its worker processes together.
"""

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import configurator
from prepare import DATA_DIR, gpt2_encoding

# -----------------------------------------------------------------------------
mode = 'prepare'  # 'prepare'
mb = 200  # size of the generated corpus, in megabytes
workers = 0  # prepare.py's --workers; 0 = one per core
seed = 1337  # seeds the generated corpus
# -----------------------------------------------------------------------------
configurator.configure(globals())


def tree_rss(pid):
    """Resident memory (bytes) of a process and all its descendants, from /proc (Linux)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f'/proc/{p}/status') as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmRSS:'))
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
    for _ in range(5):  # the median of 5 passes over ~4 MB: this machine's speed drifts from second to second
        t0 = time.perf_counter()
        n = sum(len(enc.encode_ordinary(doc)) + 1 for doc in sample)
        rates.append(n / (time.perf_counter() - t0))
    single = sorted(rates)[2]

    name = '_bench_prepare'
    cmd = [sys.executable, 'prepare.py', name, f'--input={corpus}', '--separator=<|endoftext|>', f'--workers={workers}']
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
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
    tokens = sum(int(last.split(f)[0].split()[-1].replace(',', '')) for f in (' train and', ' val tokens'))
    cores = int(last.split(' on ')[1].split()[0])

    print(f"\nprepare.py, GPT-2 BPE, {size / 1e6:,.0f} MB corpus, {tokens:,} tokens, {cores} process(es):")
    print(f"  end to end (read, encode, write):  {tokens / dt / 1e6:6.2f} M tokens/s  ({dt:.1f} s)")
    print(f"  encode_ordinary on one core:       {single / 1e6:6.2f} M tokens/s  (median of 5; "
          f"{min(rates) / 1e6:.2f} to {max(rates) / 1e6:.2f})")
    print(f"  share of the limit ({cores} x one core): {tokens / dt / (cores * single):6.0%}")
    print(f"  peak resident memory, all processes: {peak / 2**20:,.0f} MiB")
    print(f"reproduce: python bench.py --mode=prepare --mb={mb} --workers={workers}")


if mode == 'prepare':
    bench_prepare()
else:
    configurator.fail(f"mode must be 'prepare', not '{mode}'")
