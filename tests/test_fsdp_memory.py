"""
Each process of an FSDP run resumes with its shards of the state, not the whole of it: 2 Gloo processes
under torchrun resume a checkpoint of M bytes of weights and O = 2M bytes of AdamW moments, and each one's
own memory grows by less than the full state M + O while it resumes (issue 18).

What is measured, and why that measure: the process's own (anonymous) memory, not its resident set. The
checkpoint is mapped (torch.load(mmap=True)), so the file's pages a process reads count in its resident
set (VmHWM, ru_maxrss), but they are the page cache: one copy per machine, shared by all its processes,
dropped by the kernel when memory is short. Rank 0 reads every page (it scatters each tensor to the
others), so its VmHWM grows by more than the full state though it holds a shard. The tensors a process
allocates come from glibc's malloc; with MALLOC_MMAP_THRESHOLD_=128 KiB (a fixed threshold) every one of
more than 128 KiB is its own mmap, and malloc_stats' "max mmap bytes" is the peak of those, exactly and
deterministically (no sampling); tensors smaller than that are a few biases and norms. Peak growth =
that peak at the end of the resume minus the mapped bytes when load_checkpoint is called.

The bound, from how FSDP2 shards: each process keeps M/w of the weights (fully_shard), and while
set_optimizer_state_dict runs it holds the optimizer's zero-initialised shards (_init_optim_state) and the
shards it takes from the file at once: 2·O/w. So the peak growth is about (M + 2·O)/w = 5M/w, 5/6 of the
full state 3M for w = 2; after the resume (M + O)/w stays. A rank that reads the whole optimizer state
(torch.load without mmap, as one process on the CPU does) grows by the full state or more.

The script also runs as the probe: `torchrun test_fsdp_memory.py train.py <args>` runs train.py in each
process with load_checkpoint, restore_optimizer and peak_flops (the first call after the resume) wrapped
to record the memory, and writes it to $FSDP_MEMORY_OUT.<rank> (train.py itself is unchanged).
"""

import ctypes
import json
import os
import re
import sys
import tempfile


def malloc_bytes():
    """(bytes in malloc's mmapped chunks now, their peak since the process started); glibc only."""
    libc = ctypes.CDLL(None)

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()]

    libc.mallinfo2.restype = Mallinfo2
    now = libc.mallinfo2().hblkhd
    with tempfile.TemporaryFile() as f:  # malloc_stats prints to stderr: lend it a file for the call
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            libc.malloc_stats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        peak = int(re.search(rb'max mmap bytes\s*=\s*(\d+)', f.read())[1])
    return now, peak


def probe():
    """Run train.py (sys.argv[1:]) in this process, recording the memory around its resume."""
    import runpy
    sys.path[0] = os.getcwd()  # the repository copy's modules, not this file's folder
    import torch
    import checkpoint
    import devices
    with torch.device('meta'):  # the first meta-device op loads ~70 MB of PyTorch's, once: not the state's
        torch.nn.init.normal_(torch.empty(2))
    record = {}

    def at(name):
        with open('/proc/self/status') as f:
            status = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(':') for line in f)
                      if k in ('VmHWM', 'RssAnon', 'RssFile')}
        mmapped, peak = malloc_bytes()  # one reading: both at the same moment
        record[name] = dict(status, mmapped=mmapped, peak=peak)

    def wrap(module, name, before=None, after=None):
        inner = getattr(module, name)

        def wrapper(*args, **kwargs):
            before and at(before)
            result = inner(*args, **kwargs)
            after and at(after)
            return result
        setattr(module, name, wrapper)

    def done(*args, **kwargs):
        at('end')
        with open(f"{os.environ['FSDP_MEMORY_OUT']}.{os.environ.get('RANK', '0')}", 'w') as f:
            json.dump(record, f)
        return peak_flops(*args, **kwargs)

    wrap(checkpoint, 'load_checkpoint', before='start', after='loaded')
    wrap(checkpoint, 'restore_optimizer', after='restored')
    peak_flops, devices.peak_flops = devices.peak_flops, done
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name='__main__')


if __name__ == '__main__':
    probe()
    sys.exit()

import platform  # noqa: E402 (the probe above needs none of this)
import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from test_scripts import TINY, repo, run  # noqa: E402,F401

# 8.3M parameters: M = 33 MB of weights, O = 66 MB of moments; a step on 16 tokens costs little
BIG = [*TINY, '--n_layer=4', '--n_head=4', '--n_embd=416', '--batch_size=1', '--gradient_accumulation_steps=2',
       '--eval_iters=1', '--compile=False']


@pytest.mark.skipif(sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc',
                    reason="the measure is glibc's malloc_stats and Linux's /proc")
def test_fsdp_resume_keeps_each_rank_below_the_full_state(repo, tmp_path):
    run(repo, 'train.py', *BIG, '--max_iters=1', '--eval_interval=1', '--out_dir=out-fsdp-mem')
    ckpt = torch.load(repo / 'out-fsdp-mem' / 'last.pt', weights_only=True, mmap=True)
    weights = sum({v.data_ptr(): v.nbytes for v in ckpt['model'].values()}.values())  # lm_head is wte: once
    moments = sum(v.nbytes for s in ckpt['optimizer']['state'].values() for v in s.values() if v.dim())
    full, world = weights + moments, 2
    assert moments == 2 * weights  # AdamW's exp_avg and exp_avg_sq, one each per weight
    env = dict(os.environ, FSDP_MEMORY_OUT=str(tmp_path / 'memory'), MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={world}',
                        os.path.abspath(__file__), 'train.py', *BIG, '--fsdp=True', '--out_dir=out-fsdp-mem',
                        '--init_from=resume', '--eval_only=True'],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}"
    for rank in range(world):
        r = json.loads((tmp_path / f'memory.{rank}').read_text())
        grew = r['end']['peak'] - r['start']['mmapped']  # the peak of the tensors this process allocated
        kept = r['end']['mmapped'] - r['start']['mmapped']
        assert grew < (weights + 2 * moments) / world + full / 10 < full, (rank, grew, full)
        assert abs(kept - full / world) < full / 20, (rank, kept, full)  # its shards of it, after the resume
