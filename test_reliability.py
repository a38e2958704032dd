"""
When the machine says no: a disk that fills up during a save, data cut short or broken, memory that
runs out, two runs on one folder. The real train.py as a subprocess, the failure made by the OS (a
full tmpfs or a file-size limit, an address-space limit, SIGKILL), nothing mocked; each ends in one
line, with the checkpoints on disk as they were, and the run resumes.
"""

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

from test_resume import COMMON, assert_same_weights, weights
from test_scripts import TINY, assert_one_line_error, logged, repo, run, sha256  # noqa: F401 (repo is a fixture)


def train_limited(repo, *args, env=None, **limits):
    """train.py under resource limits (RLIMIT_FSIZE=bytes, RLIMIT_AS=bytes), set in the child before it starts."""
    def set_limits():
        for name, value in limits.items():
            resource.setrlimit(getattr(resource, name), (value, value))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past RLIMIT_FSIZE, a write fails (EFBIG) instead of killing
    return subprocess.run([sys.executable, 'train.py', *args], cwd=repo, capture_output=True, text=True, timeout=300,
                          preexec_fn=set_limits, env=env)


def test_disk_full_during_a_save(repo, tmp_path):
    """The save at iteration 4 runs out of space: on a tmpfs filled up but for half a checkpoint (ENOSPC),
    where the tests may mount one (root, as here and in CI), else under a file-size limit of half a
    checkpoint (EFBIG; both were seen to pass). One line says what failed, the folder's free space and the
    checkpoint's size, and that last.pt of iteration 2 resumes; no .tmp is left; both checkpoints are byte
    for byte as before. With the space back, the resume ends bit-identical to a run never interrupted."""
    args = [*COMMON, '--eval_interval=2']
    run(repo, 'train.py', *args, '--max_iters=4', '--out_dir=out-straight4')
    out = tmp_path / 'disk'
    out.mkdir()
    tmpfs = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(out)], capture_output=True).returncode == 0
    try:
        args.append(f'--out_dir={out}')
        run(repo, 'train.py', *args, '--max_iters=2')
        before = {name: sha256(out / name) for name in ('last.pt', 'ckpt.pt')}
        size = os.path.getsize(out / 'last.pt')
        if tmpfs:  # leave half a checkpoint free: enough for the log lines, not for the next save
            with open(out / 'filler', 'wb') as f:
                f.write(b'\0' * (shutil.disk_usage(out).free - size // 2))
        p = train_limited(repo, *args, '--max_iters=4', '--init_from=resume', **({} if tmpfs else
                                                                                dict(RLIMIT_FSIZE=size // 2)))
        assert_one_line_error(p, f'cannot write {out}/last.pt', 'No space left on device' if tmpfs else
                              'File too large', f'{out} has', 'free', 'the checkpoint needs', 'last.pt of iteration 2',
                              '--init_from=resume')
        assert p.returncode == 1 and 'saved last.pt' not in p.stdout
        assert not [f for f in os.listdir(out) if f.endswith('.tmp')]
        assert {name: sha256(out / name) for name in before} == before
        if tmpfs:
            os.remove(out / 'filler')
        p = run(repo, 'train.py', *args, '--max_iters=4', '--init_from=resume')
        assert sorted(logged(p.stdout, 'loss')) == [2, 3]
        assert_same_weights(weights(repo, 'out-straight4'), weights(repo, out))
    finally:
        if tmpfs:
            subprocess.run(['umount', str(out)])


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


def test_memory_estimate_is_the_measured_peak(repo):
    """At a shape where activations dominate (2 layers of 128, 256 tokens, vocab 65: 4.4 MB of activations
    per sequence against 0.4 MB of weights), the estimate train.py prints grows from 2 to 16 sequences by
    what the peak resident memory of the real train.py grows by (ru_maxrss from wait4), within 30%:
    measured 69 MB, estimated 66. Subtracting cancels what does not grow with the batch (Python, torch's
    libraries, the weights). MALLOC_MMAP_THRESHOLD_ fixes glibc's threshold, so that blocks this large come
    from mmap and go back on free: the resident peak is then the peak of the live tensors, the same in every
    run, not what the heap happens to keep (25-55% more here, varying from run to run)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='131072', OMP_NUM_THREADS='1')

    # The peak comes from a small launcher's RUSAGE_CHILDREN: Linux carries a process's maxrss over fork and exec,
    # so a train.py started straight from this (large) pytest process would report at least this one's size
    launcher = ('import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); '
                'print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)')

    def peak_and_estimate(batch_size):
        out = subprocess.run([sys.executable, '-c', launcher, sys.executable, 'train.py', '--dataset=shakespeare_char',
                              '--n_layer=2', '--n_head=4', '--n_embd=128', '--block_size=256', f'--batch_size={batch_size}',
                              '--device=cpu', '--dtype=float32', '--gradient_accumulation_steps=1', '--eval_iters=1',
                              '--max_iters=1', '--eval_interval=100', '--plot=False', f'--out_dir=out-mem{batch_size}'],
                             cwd=repo, capture_output=True, text=True, env=env, check=True).stdout
        estimate = float(re.search(r"memory a step needs, estimated: ([0-9.]+) MB", out).group(1)) * 1e6
        return int(out.split()[-1]) * 1024, estimate  # ru_maxrss is in kB on Linux

    (peak2, estimate2), (peak16, estimate16) = peak_and_estimate(2), peak_and_estimate(16)
    assert estimate16 - estimate2 == pytest.approx(peak16 - peak2, rel=0.3), (peak16 - peak2, estimate16 - estimate2)


def test_out_of_memory_gets_one_line(repo):
    """Under an address-space limit (RLIMIT_AS, 2 GiB): a model of 644 GB fails as it is built, a batch of
    200,000 sequences (7 GB of activations) in its first step; each in one line with exit status 1, saying
    where, the estimate, and the fix; for the step, a micro-batch that fits by the estimate with the same
    tokens per step. The checkpoint from before is untouched."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MALLOC_ARENA_MAX='2')  # few threads: little address space reserved
    limit = dict(RLIMIT_AS=2 << 30)
    p = train_limited(repo, *TINY, '--n_layer=200', '--n_embd=8192', '--n_head=64', '--out_dir=out-oom-build',
                      env=env, **limit)
    assert_one_line_error(p, 'out of memory building the model on cpu', 'weights 644.3 GB', 'a smaller model')
    assert p.returncode == 1

    run(repo, 'train.py', *TINY, '--max_iters=2', '--eval_interval=2', '--out_dir=out-oom')
    before = sha256(repo / 'out-oom' / 'last.pt')
    p = train_limited(repo, *TINY, '--batch_size=200000', '--gradient_accumulation_steps=4', '--max_iters=4',
                      '--eval_interval=100', '--init_from=resume', '--out_dir=out-oom', env=env, **limit)
    assert_one_line_error(p, 'out of memory in a training step on cpu', 'by the estimate', 'keeps the tokens per step')
    assert p.returncode == 1
    b, g = map(int, re.search(r'--batch_size=(\d+) --gradient_accumulation_steps=(\d+)', p.stderr).groups())
    assert b < 200000 and b * g == 200000 * 4
    assert sha256(repo / 'out-oom' / 'last.pt') == before


def test_one_run_per_out_dir(repo):
    """A second train.py on a folder in use refuses in one line naming the first (pid, host); once the first
    is killed with SIGKILL, leaving its lock file behind, a resume takes the lock over, says so, and trains;
    at its end the lock is gone."""
    args = [*TINY, '--eval_interval=100000', '--checkpoint_interval=1', '--out_dir=out-lock']
    first = subprocess.Popen([sys.executable, 'train.py', *args, '--max_iters=100000'], cwd=repo,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:  # under way, with a checkpoint to resume
            if line.startswith('saved last.pt at iteration 2'):
                break
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
