"""
Never losing a run: a resumed run is bit-identical to an uninterrupted one (also when it was
killed at random moments, when its first save found the disk full, and under torchrun), a
non-finite loss stops without touching the checkpoints (SIGTERM: test_training.py). The real
train.py, as a subprocess, on tiny models; one uninterrupted run (straight) and one of its first
12 iterations (twelve) serve every test that resumes or compares.
"""

import json
import os
import random
import re
import resource
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


def train_limited(repo, *args, env=None, **limits):
    """train.py under resource limits (RLIMIT_FSIZE=bytes, RLIMIT_AS=bytes), set in the child before it starts."""
    def set_limits():
        for name, value in limits.items():
            resource.setrlimit(getattr(resource, name), (value, value))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past RLIMIT_FSIZE, a write fails (EFBIG) instead of killing
    return subprocess.run([sys.executable, 'train.py', *args], cwd=repo, capture_output=True, text=True, timeout=300,
                          preexec_fn=set_limits, env=env)


def torchrun(repo, *args):
    p = subprocess.run([*TORCHRUN, 'train.py', *args], cwd=repo, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope='module')
def straight(repo):  # noqa: F811
    """COMMON for 60 iterations, never interrupted: what a run resumed (after a stop, a full disk) or killed at
    random moments must end as, and, in its first 12 losses, what a watched run must log. out-straight."""
    return run(repo, 'train.py', *COMMON, '--max_iters=60', '--out_dir=out-straight')


@pytest.fixture(scope='module')
def twelve(repo):  # noqa: F811
    """The first 12 of those iterations in a run of its own, watched (a sampled continuation printed at each
    evaluation) with plot=False: its stdout; its folder out-12, which the tests copy before resuming it."""
    return run(repo, 'train.py', *COMMON, '--max_iters=12', '--out_dir=out-12', '--eval_sample=ROMEO:',
               '--eval_sample_tokens=30', '--eval_sample_temperature=1.0', '--watch_interval=0')


def resume_twelve(repo, out_dir):
    """A copy of out-12 at out_dir (a path, or a name in repo), to resume."""
    shutil.copytree(repo / 'out-12', repo / out_dir, dirs_exist_ok=True)
    return repo / out_dir


def test_resume_is_bit_identical(repo, straight, twelve):
    """60 iterations straight, versus 12, stop, resume to 60: the same loss at every step, the same weights."""
    resume_twelve(repo, 'out-r12')
    second = run(repo, 'train.py', *COMMON, '--max_iters=60', '--out_dir=out-r12', '--init_from=resume', '--plot=True')
    assert 'max_iters: 12 in the checkpoint, now 60' in second.stdout  # a change that is allowed, and said
    losses = logged(straight.stdout, 'loss')
    assert sorted(losses) == list(range(60))
    assert losses == {**logged(twelve.stdout, 'loss'), **logged(second.stdout, 'loss')}
    assert_same_weights(weights(repo, 'out-straight'), weights(repo, 'out-r12'))
    # the log as data: each iteration once, evaluations at 0, 6, ... 60, even across the resume
    records = [json.loads(line) for line in (repo / 'out-r12' / 'log.jsonl').read_text().splitlines()]
    assert [r['iter'] for r in records if 'loss' in r] == list(range(60))
    assert [r['iter'] for r in records if 'val_loss' in r] == list(range(0, 61, 6))
    assert [r['loss'] for r in records if 'loss' in r] == pytest.approx([losses[i] for i in range(60)], abs=1e-4)
    assert all(r['tokens'] == (r['iter'] + 1) * 2 * 4 * 16 for r in records if 'loss' in r)
    assert (repo / 'out-r12' / 'loss.png').read_bytes()[:4] == b'\x89PNG'


def test_watching_does_not_change_the_run(repo, straight, twelve):
    """A sampled continuation printed at each evaluation draws random numbers, from a generator of
    its own: the run's random state is untouched, the losses are those of the run without it."""
    assert len(re.findall(r"^sample: .ROMEO:", twelve.stdout, re.M)) == 3  # at 0, 6 and 12
    assert logged(twelve.stdout, 'loss') == {i: loss for i, loss in logged(straight.stdout, 'loss').items() if i < 12}
    assert not (repo / 'out-12' / 'loss.png').exists()  # plot=False: evaluations to watch, but nothing drawn


def test_resume_refuses_another_architecture(repo, twelve):
    resume_twelve(repo, 'out-arch')
    p = run(repo, 'train.py', *TINY, '--n_layer=2', '--init_from=resume', '--out_dir=out-arch', ok=False)
    assert_one_line_error(p, 'n_layer = 1', 'n_layer = 2', 'same config file')


def test_killed_at_random_moments(repo, straight):
    """SIGKILL at random moments, resuming each time: every checkpoint on disk loads at every
    moment we look, training reaches max_iters, and the weights equal an uninterrupted run's."""
    # 60 iterations take a second or two: four kills, each within 0.15 s of progress, leave most of them to do
    args = [*COMMON, '--max_iters=60', '--checkpoint_interval=1']
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
            # at that moment, or once 12 more iterations are on disk: four kills fit in 60 however fast they run
            if kill_at is not None and (time.time() > kill_at or now.get('last.pt', -1) >= done + 12):
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
    assert_same_weights(weights(repo, 'out-straight'), weights(repo, 'out-killed'))


def test_non_finite_loss_stops_without_saving(repo, twelve):
    """Resumed at iteration 12 with a learning rate of 1e30: the step makes the weights ~1e30, the next loss is
    not finite, and the run stops in one line, the checkpoints untouched (no evaluation falls between:
    eval_interval=5)."""
    resume_twelve(repo, 'out-nan')
    huge = [*TINY, '--max_iters=40', '--eval_interval=5', '--learning_rate=1e30', '--grad_clip=0.0', '--warmup_iters=0',
            '--init_from=resume', '--out_dir=out-nan']
    before = {name: sha256(repo / 'out-nan' / name) for name in ('last.pt', 'ckpt.pt')}
    p = run(repo, 'train.py', *huge, ok=False)
    assert_one_line_error(p, 'at iteration 13', 'stopping')
    assert {name: sha256(repo / 'out-nan' / name) for name in before} == before
    # with a checkpoint due at every iteration: the weights the huge step made (~1e30, whose loss is not
    # finite) never reach the disk, so the run resumes with a sane learning rate
    p = run(repo, 'train.py', *huge, '--checkpoint_interval=1', ok=False)
    assert_one_line_error(p, 'at iteration 13', 'stopping')
    last = torch.load(repo / 'out-nan' / 'last.pt', weights_only=True)
    assert last['iter_num'] == 12 and max(v.abs().max().item() for v in last['model'].values()) < 100
    run(repo, 'train.py', *TINY, '--max_iters=14', '--eval_interval=5', '--init_from=resume', '--out_dir=out-nan')


def test_disk_full_during_a_save(repo, tmp_path, straight, twelve):
    """The first save of a resumed run (at iteration 12) runs out of space: on a tmpfs filled up but for half a
    checkpoint (ENOSPC), where the tests may mount one (root, as here and in CI), else under a file-size limit
    of half a checkpoint (EFBIG; both were seen to pass). One line says what failed, the folder's free space and
    the checkpoint's size, and that last.pt of iteration 12 resumes; no .tmp is left; both checkpoints are byte
    for byte as before. With the space back, the resume ends bit-identical to a run never interrupted."""
    out = tmp_path / 'disk'
    out.mkdir()
    tmpfs = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(out)], capture_output=True).returncode == 0
    try:
        args = [*COMMON, '--max_iters=60', f'--out_dir={out}', '--init_from=resume']
        resume_twelve(repo, out)
        before = {name: sha256(out / name) for name in ('last.pt', 'ckpt.pt')}
        size = os.path.getsize(out / 'last.pt')
        if tmpfs:  # leave half a checkpoint free: enough for the log lines, not for the next save
            with open(out / 'filler', 'wb') as f:
                f.write(b'\0' * (shutil.disk_usage(out).free - size // 2))
        p = train_limited(repo, *args, **({} if tmpfs else dict(RLIMIT_FSIZE=size // 2)))
        assert_one_line_error(p, f'cannot write {out}/last.pt', 'No space left on device' if tmpfs else
                              'File too large', f'{out} has', 'free', 'the checkpoint needs', 'last.pt of iteration 12',
                              '--init_from=resume')
        assert p.returncode == 1 and 'saved last.pt' not in p.stdout
        assert not [f for f in os.listdir(out) if f.endswith('.tmp')]
        assert {name: sha256(out / name) for name in before} == before
        if tmpfs:
            os.remove(out / 'filler')
        p = run(repo, 'train.py', *args)
        assert sorted(logged(p.stdout, 'loss')) == list(range(12, 60))
        assert_same_weights(weights(repo, 'out-straight'), weights(repo, out))
    finally:
        if tmpfs:
            subprocess.run(['umount', str(out)])


# 2 processes and 4 micro-steps in all, with dropout: each global micro-step has its own dropout seed
TWO = [*TINY, '--gradient_accumulation_steps=4', '--max_iters=8', '--eval_interval=4', '--learning_rate=1e-3',
       '--warmup_iters=2', '--lr_decay_iters=8', '--dropout=0.3']


@pytest.fixture(scope='module')
def one(repo):  # noqa: F811
    """The one process that 2 under DDP and 2 under FSDP must equal: its stdout; its folder out-one."""
    return run(repo, 'train.py', *TWO, '--out_dir=out-one')


@pytest.mark.parametrize('mode', ['ddp', 'fsdp'])
def test_two_processes_equal_one(repo, one, mode):
    """torchrun with 2 Gloo processes and 4 micro-steps in all reads the same batches as one
    process with 4, and draws the same dropout masks (rank 1's masks are not rank 0's: they are
    those of micro-steps 2 and 3, as in one process): the same weights within 1e-6, one log, one
    checkpoint. Resuming under torchrun continues bit-identically."""
    # (sums in another order differ in the last bits; Adam's g / sqrt(v) magnifies that for tiny
    # gradients in proportion to the learning rate: at 1e-2 the weights drift 2e-6 apart in 8 steps)
    two = torchrun(repo, *TWO, f'--fsdp={mode == "fsdp"}', f'--out_dir=out-{mode}', '--plot=True')
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
    torchrun(repo, *TWO, '--max_iters=4', f'--fsdp={mode == "fsdp"}', f'--out_dir=out-{mode}-r')
    if mode == 'fsdp':  # its checkpoint holds whole tensors: one process without FSDP resumes it, to 8 as well
        shutil.copytree(repo / 'out-fsdp-r', repo / 'out-fsdp-1p')
        p = run(repo, 'train.py', *TWO, '--out_dir=out-fsdp-1p', '--init_from=resume')
        assert sorted(logged(p.stdout, 'loss')) == [4, 5, 6, 7] and '1 process(es)' in p.stdout
        for k, v in weights(repo, 'out-fsdp-1p').items():
            torch.testing.assert_close(v, a[k], rtol=0, atol=1e-6)
    torchrun(repo, *TWO, f'--fsdp={mode == "fsdp"}', f'--out_dir=out-{mode}-r', '--init_from=resume')
    assert_same_weights(b, weights(repo, f'out-{mode}-r'))


def test_accumulation_not_divisible_by_processes(repo):
    p = subprocess.run([*TORCHRUN, 'train.py', *TINY, '--gradient_accumulation_steps=3', '--out_dir=out-odd'],
                       cwd=repo, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert 'gradient_accumulation_steps 3 is not divisible by the 2 processes' in p.stderr
    assert p.stderr.count('error: gradient_accumulation_steps 3') == 1  # one line from rank 0 (others name their rank)


def test_evaluation_is_the_mean_over_its_batches(repo):
    """estimate_loss: the mean loss over every target of the split's eval_iters batches (the windows batches.draw
    gives stream (0, 2, k, 0) for val), computed here from the checkpoint of the evaluated weights. The same with
    the 3 batches in one forward (1 process) and on 2 processes, where rank 1's second batch repeats the last
    one and must not count."""
    import numpy as np
    import torch.nn.functional as F
    from checkpoint import load_checkpoint
    from batches import draw
    args = [*TINY, '--eval_iters=3', '--max_iters=1', '--eval_interval=1', '--gradient_accumulation_steps=2']
    run(repo, 'train.py', *args, '--out_dir=out-eval1')
    torchrun(repo, *args, '--out_dir=out-eval2')
    model, _ = load_checkpoint(str(repo / 'out-eval1' / 'ckpt.pt'), 'cpu')
    ids = np.fromfile(repo / 'data' / 'shakespeare_char' / 'val.bin', dtype=np.uint16).astype(np.int64)
    nll, count = 0.0, 0
    for k in range(3):
        rows = torch.from_numpy(np.stack([ids[i:i + 17] for i in draw((0, 2, k, 0), 4, len(ids) - 16)]))  # (4, 17)
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (4, 16) each
        with torch.no_grad():
            logits, _ = model(x, y)
        nll += F.cross_entropy(logits.double().flatten(0, 1), y.flatten(), reduction='sum').item()
        count += y.numel()
    vals = [[r['val_loss'] for r in map(json.loads, (repo / out / 'log.jsonl').read_text().splitlines())
             if r.get('iter') == 1 and 'val_loss' in r][0] for out in ('out-eval1', 'out-eval2')]
    assert vals == pytest.approx([nll / count] * 2, abs=1e-5)
