"""
When the machine says no: data cut short or broken, memory that runs out, two runs on one folder (a disk
that fills up during a save: test_resume.py, beside the uninterrupted run it is compared with). The real
train.py as a subprocess, the failure made by the OS (an address-space limit, SIGKILL), nothing mocked;
each ends in one line, with the checkpoints on disk as they were, and the run resumes.
"""

import fcntl
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from test_resume import train_limited
from test_scripts import TINY, assert_one_line_error, logged, repo, run, sha256  # noqa: F401 (repo is a fixture)


def test_data_cut_short_or_broken(repo):
    """A .bin shorter than meta.json says, by an odd or an even number of bytes, a meta.json that is not
    JSON, one without a key: one line each, naming the file, what was expected and found, and the
    prepare.py command that remakes it; from train.py and sample.py alike."""
    data = repo / 'data' / 'cut'
    shutil.copytree(repo / 'data' / 'shakespeare_char', data)
    sys.path.insert(0, str(repo))
    from model import GPT, GPTConfig
    model_args = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=65, bias=True, dropout=0.0)
    (repo / 'out-cut').mkdir()  # a checkpoint of this dataset, for sample.py
    torch.save(dict(model=GPT(GPTConfig(**model_args)).state_dict(), model_args=model_args, iter_num=0,
                    config=dict(dataset='cut')), repo / 'out-cut' / 'ckpt.pt')
    whole = (data / 'train.bin').read_bytes()
    assert len(whole) == 2 * 1003854
    for cut in (1, 2000):  # odd: not even a whole number of tokens; even: it reads, but ends early
        (data / 'train.bin').write_bytes(whole[:-cut])
        p = run(repo, 'train.py', *TINY, '--dataset=cut', '--out_dir=out-cut2', ok=False)
        assert_one_line_error(p, f'{data}/train.bin has {len(whole) - cut:,} bytes', '1,003,854 uint16 tokens',
                              '2,007,708 bytes', "'python prepare.py cut'")
    (data / 'train.bin').write_bytes(whole)
    meta = (data / 'meta.json').read_text(encoding='utf-8')
    (data / 'meta.json').write_text(meta[:len(meta) // 2], encoding='utf-8')  # a copy cut short
    p = run(repo, 'train.py', *TINY, '--dataset=cut', '--out_dir=out-cut2', ok=False)
    assert_one_line_error(p, f'{data}/meta.json is unreadable', 'JSONDecodeError', "'python prepare.py cut'")
    (data / 'meta.json').write_text(meta.replace('"train_tokens"', '"train_tokenz"'), encoding='utf-8')
    p = run(repo, 'sample.py', '--out_dir=out-cut', '--max_new_tokens=2', ok=False)
    assert_one_line_error(p, f'{data}/meta.json lacks train_tokens', "'python prepare.py cut'")


# At this shape activations dominate (2 layers of 128, 256 tokens, vocab 65: 4.4 MB of activations per sequence
# against 0.4 MB of weights)
MEMORY = ['--dataset=shakespeare_char', '--n_layer=2', '--n_head=4', '--n_embd=128', '--block_size=256',
          '--device=cpu', '--dtype=float32', '--eval_iters=1', '--plot=False']


def peak_and_estimate(repo, batch_size):
    """One iteration of train.py at MEMORY's shape, in out-mem<batch_size>: (its peak resident memory, the
    estimate it printed), in bytes. MALLOC_MMAP_THRESHOLD_ fixes glibc's threshold, so that blocks this large
    come from mmap and go back on free: the resident peak is then the peak of the live tensors, the same in
    every run, not what the heap happens to keep (25-55% more here, varying from run to run)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='131072', OMP_NUM_THREADS='1')
    # train.py runs (runpy) in a process that prints its own peak when the script is done, before the
    # interpreter's teardown, which with torch's CUDA build pages in more than a step of this size needs.
    # That process starts from a small launcher: Linux carries a process's maxrss over fork and exec, so
    # one started straight from this (large) pytest process would report at least this one's size
    script = ('import resource, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], '
              'run_name="__main__"); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)')
    launcher = 'import subprocess, sys; subprocess.run(sys.argv[1:], check=True)'
    out = subprocess.run([sys.executable, '-c', launcher, sys.executable, '-c', script, 'train.py', *MEMORY,
                          f'--batch_size={batch_size}', '--gradient_accumulation_steps=1', '--max_iters=1',
                          '--eval_interval=100', f'--out_dir=out-mem{batch_size}'],
                         cwd=repo, capture_output=True, text=True, env=env, check=True).stdout
    estimate = float(re.search(r"memory a step needs, estimated: ([0-9.]+) MB", out).group(1)) * 1e6
    return int(out.split()[-1]) * 1024, estimate  # ru_maxrss is in kB on Linux


@pytest.fixture(scope='module')
def batch2(repo):  # noqa: F811
    """peak_and_estimate at 2 sequences; its checkpoint, out-mem2/last.pt, is the one that an out-of-memory
    step must leave as it was."""
    return peak_and_estimate(repo, 2)


def test_memory_estimate_is_the_measured_peak(repo, batch2):
    """The estimate train.py prints grows from 2 to 16 sequences by what the peak resident memory of the real
    train.py grows by (ru_maxrss from wait4), within 30%: measured 69 MB, estimated 66. Subtracting cancels
    what does not grow with the batch (Python, torch's libraries, the weights)."""
    (peak2, estimate2), (peak16, estimate16) = batch2, peak_and_estimate(repo, 16)
    assert estimate16 - estimate2 == pytest.approx(peak16 - peak2, rel=0.3), (peak16 - peak2, estimate16 - estimate2)


def torch_address_space(env):
    """Bytes of address space a process has mapped once torch is imported (VmPeak): about 0.6 GB with
    the CPU build, several GB with the CUDA build, whose libraries are mapped even without a GPU."""
    code = ("import torch; torch.zeros(1); print(next(int(line.split()[1]) * 1024 for line in "
            "open('/proc/self/status') if line.startswith('VmPeak:')))")
    return int(subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                              check=True).stdout)


def test_out_of_memory_gets_one_line(repo, batch2):
    """Under an address-space limit (RLIMIT_AS, 1.5 GiB above what torch itself maps, so the same on
    PyTorch's CPU and CUDA builds): a model of 644 GB fails as it is built, a batch of
    2,000 sequences of 256 tokens (8.8 GB of activations) in its first step, resumed from the checkpoint of
    batch2; each in one line with exit status 1, saying where, the estimate, and the fix; for the step, a
    micro-batch that fits by the estimate with the same tokens per step. The checkpoint from before is untouched."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MALLOC_ARENA_MAX='2')  # few threads: little address space reserved
    limit = dict(RLIMIT_AS=torch_address_space(env) + (3 << 29))  # what torch maps, and 1.5 GiB more
    p = train_limited(repo, *TINY, '--n_layer=200', '--n_embd=8192', '--n_head=64', '--out_dir=out-oom-build',
                      env=env, **limit)
    assert_one_line_error(p, 'out of memory building the model on cpu', 'weights 644.3 GB', 'a smaller model')
    assert p.returncode == 1

    shutil.copytree(repo / 'out-mem2', repo / 'out-oom')
    before = sha256(repo / 'out-oom' / 'last.pt')
    p = train_limited(repo, *MEMORY, '--batch_size=2000', '--gradient_accumulation_steps=4', '--max_iters=4',
                      '--eval_interval=100', '--init_from=resume', '--out_dir=out-oom', env=env, **limit)
    assert_one_line_error(p, 'out of memory in a training step on cpu', 'by the estimate', 'keeps the tokens per step')
    assert p.returncode == 1
    b, g = map(int, re.search(r'--batch_size=(\d+) --gradient_accumulation_steps=(\d+)', p.stderr).groups())
    assert b < 2000 and b * g == 2000 * 4
    assert sha256(repo / 'out-oom' / 'last.pt') == before


def test_one_run_per_out_dir(repo):
    """A second train.py on a folder in use refuses in one line naming the first (pid, host); once the first
    is killed with SIGKILL, leaving its lock file behind, a resume takes the lock over, says so, and trains;
    at its end the lock is gone."""
    args = [*TINY, '--eval_interval=100000', '--checkpoint_interval=1', '--out_dir=out-lock']
    # its stdout: a pipe of one page (4 KiB) that this test stops reading, so that the first run, line-buffered,
    # soon blocks (with its lock) instead of training on beside the second's start, on the same cores
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    first = subprocess.Popen([sys.executable, 'train.py', *args, '--max_iters=100000'], cwd=repo, stdout=w,
                             stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    os.close(w)
    try:
        with open(r, 'rb', buffering=0) as out:  # unbuffered: readline takes no byte past the line's end
            while not (line := out.readline()).startswith(b'saved last.pt at iteration 2'):  # under way, resumable
                assert line, 'the first run ended'
            p = run(repo, 'train.py', *args, '--max_iters=1', ok=False)  # (were it not refused: over at once)
        assert_one_line_error(p, 'out-lock is in use by another train.py', f'pid {first.pid} on {socket.gethostname()}')
    finally:
        first.kill()
        first.wait()
    assert (repo / 'out-lock' / 'train.lock').exists()  # what a kill -9 leaves
    stopped = torch.load(repo / 'out-lock' / 'last.pt', weights_only=True)['iter_num']
    p = run(repo, 'train.py', *args, f'--max_iters={stopped + 2}', '--init_from=resume')
    assert 'taking over' in p.stdout and f'pid {first.pid} on' in p.stdout
    assert sorted(logged(p.stdout, 'loss')) == [stopped, stopped + 1]
    assert not (repo / 'out-lock' / 'train.lock').exists()
