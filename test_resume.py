"""
Never losing a run: a resumed run is bit-identical to an uninterrupted one (also when it was
killed at random moments, and under torchrun), SIGTERM saves and exits cleanly, a non-finite
loss stops without touching the checkpoints. The real train.py, as a subprocess, on tiny models.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_scripts import TINY, assert_one_line_error, logged, repo, run, sha256  # noqa: F401 (repo is a fixture)

COMMON = [*TINY, '--learning_rate=1e-2', '--min_lr=1e-3', '--warmup_iters=4', '--lr_decay_iters=24',
          '--dropout=0.1', '--gradient_accumulation_steps=2', '--eval_interval=6']
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def weights(repo, out_dir, name='last.pt'):
    return torch.load(repo / out_dir / name, weights_only=True)['model']


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def torchrun(repo, *args):
    p = subprocess.run([*TORCHRUN, 'train.py', *args], cwd=repo, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}"
    return p


def test_resume_is_bit_identical(repo):
    """24 iterations straight, versus 12, stop, resume to 24: the same loss at every step, the same weights."""
    straight = run(repo, 'train.py', *COMMON, '--max_iters=24', '--out_dir=out-r24')
    first = run(repo, 'train.py', *COMMON, '--max_iters=12', '--out_dir=out-r12', '--plot=True')
    second = run(repo, 'train.py', *COMMON, '--max_iters=24', '--out_dir=out-r12', '--init_from=resume', '--plot=True')
    assert 'max_iters: 12 in the checkpoint, now 24' in second.stdout  # a change that is allowed, and said
    losses = logged(straight.stdout, 'loss')
    assert sorted(losses) == list(range(24))
    assert losses == {**logged(first.stdout, 'loss'), **logged(second.stdout, 'loss')}
    assert_same_weights(weights(repo, 'out-r24'), weights(repo, 'out-r12'))
    # the log as data: each iteration once, evaluations at 0, 6, ... 24, even across the resume
    records = [json.loads(line) for line in (repo / 'out-r12' / 'log.jsonl').read_text().splitlines()]
    assert [r['iter'] for r in records if 'loss' in r] == list(range(24))
    assert [r['iter'] for r in records if 'val_loss' in r] == [0, 6, 12, 18, 24]
    assert [r['loss'] for r in records if 'loss' in r] == pytest.approx([losses[i] for i in range(24)], abs=1e-4)
    assert all(r['tokens'] == (r['iter'] + 1) * 2 * 4 * 16 for r in records if 'loss' in r)
    assert (repo / 'out-r12' / 'loss.png').read_bytes()[:4] == b'\x89PNG'


def test_watching_does_not_change_the_run(repo):
    """A sampled continuation printed at each evaluation draws random numbers, but puts the
    random state back: the losses are those of the run without it."""
    plain = run(repo, 'train.py', *COMMON, '--max_iters=12', '--out_dir=out-plain', '--plot=False')
    watched = run(repo, 'train.py', *COMMON, '--max_iters=12', '--out_dir=out-watched', '--eval_sample=ROMEO:',
                  '--eval_sample_tokens=30', '--eval_sample_temperature=1.0', '--watch_interval=0')
    assert len(re.findall(r"^sample: .ROMEO:", watched.stdout, re.M)) == 3  # at 0, 6 and 12
    assert logged(plain.stdout, 'loss') == logged(watched.stdout, 'loss')
    assert not (repo / 'out-plain' / 'loss.png').exists()


def test_resume_refuses_another_architecture(repo):
    run(repo, 'train.py', *TINY, '--max_iters=1', '--eval_interval=1', '--out_dir=out-arch')
    p = run(repo, 'train.py', *TINY, '--n_layer=2', '--init_from=resume', '--out_dir=out-arch', ok=False)
    assert_one_line_error(p, 'n_layer = 1', 'n_layer = 2', 'same config file')


def test_killed_at_random_moments(repo):
    """SIGKILL at random moments, resuming each time: every checkpoint on disk loads at every
    moment we look, training reaches max_iters, and the weights equal an uninterrupted run's."""
    # 60 iterations take a few seconds: four kills, each within 0.15 s of progress, leave most of them to do
    args = [*COMMON, '--max_iters=60', '--checkpoint_interval=1']
    run(repo, 'train.py', *args, '--out_dir=out-calm')
    last = repo / 'out-killed' / 'last.pt'
    rng, kills, init, done = random.Random(0), 0, 'scratch', -1
    while True:
        p = subprocess.Popen([sys.executable, 'train.py', *args, '--out_dir=out-killed', f'--init_from={init}'],
                             cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        kill_at = None
        while p.poll() is None:
            # whatever moment this is, the files on disk are whole checkpoints
            now = {name: torch.load(repo / 'out-killed' / name, weights_only=True)['iter_num']
                   for name in ('last.pt', 'ckpt.pt') if (repo / 'out-killed' / name).exists()}
            if kill_at is None and kills < 4 and now.get('last.pt', -1) > done:
                kill_at = time.time() + rng.uniform(0.0, 0.15)  # once this run has made progress: soon, at random
            if kill_at is not None and time.time() > kill_at:
                p.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.02)
        p.wait()
        assert p.returncode in (0, -signal.SIGKILL), p.stderr.read()
        if p.returncode == 0:
            break
        done, init = torch.load(last, weights_only=True)['iter_num'], 'resume'
    assert kills == 4  # the test did interrupt training, each time after some progress
    assert torch.load(last, weights_only=True)['iter_num'] == 60
    assert_same_weights(weights(repo, 'out-calm'), weights(repo, 'out-killed'))


def test_sigterm_saves_and_exits_cleanly(repo):
    args = [*COMMON, '--max_iters=100000', '--eval_interval=100000', '--out_dir=out-term']
    p = subprocess.Popen([sys.executable, 'train.py', *args], cwd=repo, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # wait until training is under way
        if line.startswith('iter 3:'):
            break
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert 'stopped by SIGTERM' in out and '--init_from=resume' in out
    stopped = torch.load(repo / 'out-term' / 'last.pt', weights_only=True)['iter_num']
    assert stopped >= 4
    again = run(repo, 'train.py', *args[:-3], f'--max_iters={stopped + 2}', '--eval_interval=100000',
                '--out_dir=out-term', '--init_from=resume')
    assert sorted(logged(again.stdout, 'loss')) == [stopped, stopped + 1]


def test_non_finite_loss_stops_without_saving(repo):
    run(repo, 'train.py', *TINY, '--max_iters=2', '--eval_interval=2', '--out_dir=out-nan')
    before = {name: sha256(repo / 'out-nan' / name) for name in ('last.pt', 'ckpt.pt')}
    p = run(repo, 'train.py', *TINY, '--max_iters=40', '--eval_interval=4', '--learning_rate=1e30',
            '--grad_clip=0.0', '--warmup_iters=0', '--init_from=resume', '--out_dir=out-nan', ok=False)
    assert_one_line_error(p, 'at iteration', 'stopping')
    assert {name: sha256(repo / 'out-nan' / name) for name in before} == before
    # with a checkpoint due at every iteration: the weights the huge step made (~1e30, whose loss is not
    # finite) never reach the disk, so the run resumes with a sane learning rate
    p = run(repo, 'train.py', *TINY, '--max_iters=40', '--eval_interval=4', '--learning_rate=1e30', '--grad_clip=0.0',
            '--warmup_iters=0', '--checkpoint_interval=1', '--init_from=resume', '--out_dir=out-nan', ok=False)
    assert_one_line_error(p, 'at iteration', 'stopping')
    last = torch.load(repo / 'out-nan' / 'last.pt', weights_only=True)
    assert last['iter_num'] == 2 and max(v.abs().max().item() for v in last['model'].values()) < 100
    run(repo, 'train.py', *TINY, '--max_iters=4', '--eval_interval=4', '--init_from=resume', '--out_dir=out-nan')


@pytest.mark.parametrize('mode', ['ddp', 'fsdp'])
def test_two_processes_equal_one(repo, mode):
    """torchrun with 2 Gloo processes and 4 micro-steps in all reads the same batches as one
    process with 4: the same weights within 1e-6, one log, one checkpoint. Resuming under
    torchrun continues bit-identically."""
    # (sums in another order differ in the last bits; Adam's g / sqrt(v) magnifies that for tiny
    # gradients in proportion to the learning rate: at 1e-2 the weights drift 2e-6 apart in 8 steps)
    args = [*TINY, '--gradient_accumulation_steps=4', '--max_iters=8', '--eval_interval=4', '--learning_rate=1e-3',
            '--warmup_iters=2', '--lr_decay_iters=8']
    one = run(repo, 'train.py', *args, '--out_dir=out-one')
    two = torchrun(repo, *args, f'--fsdp={mode == "fsdp"}', f'--out_dir=out-{mode}', '--plot=True')
    assert two.stdout.count('iter 7:') == 1 and '2 process(es)' in two.stdout
    a, b = weights(repo, 'out-one'), weights(repo, f'out-{mode}')
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    for it, loss in logged(one.stdout, 'loss').items():
        assert logged(two.stdout, 'loss')[it] == pytest.approx(loss, abs=1e-5)
    # the evaluations too: each process takes every other batch, and the sums are added up
    val = lambda p: [float(v) for v in re.findall(r'val loss ([0-9.]+)', p.stdout)]
    assert len(val(one)) == 3 and val(two) == pytest.approx(val(one), abs=1e-4)
    assert sorted(os.listdir(repo / f'out-{mode}')) == ['ckpt.pt', 'last.pt', 'log.jsonl', 'loss.png']  # one of each
    # 4 steps, resume to 8 under torchrun: bit-identical to the 8 straight
    torchrun(repo, *args, '--max_iters=4', f'--fsdp={mode == "fsdp"}', f'--out_dir=out-{mode}-r')
    if mode == 'fsdp':  # its checkpoint holds whole tensors: one process without FSDP resumes it, to 8 as well
        shutil.copytree(repo / 'out-fsdp-r', repo / 'out-fsdp-1p')
        p = run(repo, 'train.py', *args, '--out_dir=out-fsdp-1p', '--init_from=resume')
        assert sorted(logged(p.stdout, 'loss')) == [4, 5, 6, 7] and '1 process(es)' in p.stdout
        for k, v in weights(repo, 'out-fsdp-1p').items():
            torch.testing.assert_close(v, a[k], rtol=0, atol=1e-6)
    torchrun(repo, *args, f'--fsdp={mode == "fsdp"}', f'--out_dir=out-{mode}-r', '--init_from=resume')
    assert_same_weights(b, weights(repo, f'out-{mode}-r'))


def test_accumulation_not_divisible_by_processes(repo):
    p = subprocess.run([*TORCHRUN, 'train.py', *TINY, '--gradient_accumulation_steps=3', '--out_dir=out-odd'],
                       cwd=repo, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert 'gradient_accumulation_steps 3 is not divisible by the 2 processes' in p.stderr
    assert p.stderr.count('error: gradient_accumulation_steps 3') == 1  # one line from rank 0 (others name their rank)
