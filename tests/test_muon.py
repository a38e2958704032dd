"""
optimizer='muon': Muon's update is an orthogonalised matrix (its singular values near 1, not the
gradient's), the rest keeps AdamW; a Muon run learns like an AdamW run on the same batches, resumes
bit-identically, and under torchrun (DDP, 2 Gloo processes) equals one process; FSDP is refused.
"""

import os
import subprocess
import sys

import pytest
import torch

from muon import make_optimizer
from test_model import one_thread, random_idx, tiny  # noqa: F401 (one_thread is an autouse fixture)
from test_resume import assert_same_weights, torchrun, weights
from test_scripts import TINY, assert_one_line_error, logged, repo, run  # noqa: F401 (repo is a fixture)


def test_muon_orthogonalises_the_blocks_matrices_and_adamw_the_rest():
    """One step from rest: each block matrix moves by lr * sqrt(max(1, out/in)) times a matrix whose
    singular values mostly lie near 1 (Newton-Schulz's US'V^T, S' in about [0.5, 1.5]: Keller Jordan's write-up),
    whatever the gradient's spread; AdamW's first step moves every other weight by lr (|m / sqrt(v)| = 1)."""
    m = tiny(n_embd=32, n_head=2)
    m.train()
    opt = make_optimizer(m, 0.0, 1e-3, (0.9, 0.95), 'cpu', 'muon', muon_learning_rate=0.02)
    muon, adamw = opt.optimizers
    assert {id(p) for p in muon.param_groups[0]['params']} == {id(p) for p in m.transformer.h.parameters()
                                                                if p.dim() == 2}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    idx = random_idx()
    m(idx, idx)[1].backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    for g in opt.param_groups:
        g['lr'] = (0.02 if g in muon.param_groups else 1e-3)
    opt.step()
    for n, p in m.named_parameters():
        delta = before[n] - p.detach()
        if n.startswith('transformer.h.') and p.dim() == 2:
            out, inp = p.shape
            s = torch.linalg.svdvals(delta / (0.02 * max(1, out / inp) ** 0.5))
            assert 0.6 < s.median() and s.max() < 1.6, (n, s)  # (5 steps leave the tiniest directions short)
            g = torch.linalg.svdvals(grads[n])
            assert g.max() / g.median() > 2 * s.max() / s.median(), (n, g)  # the gradient's spread is far wider
        else:
            moved = delta[grads[n].abs() > 1e-5].abs()  # (the keys' bias has a zero gradient, up to rounding)
            torch.testing.assert_close(moved, torch.full_like(moved, 1e-3), rtol=1e-2, atol=0)
    # the state of both in one torch.optim-format dict, loaded back into a fresh pair
    sd = opt.state_dict()
    assert len(sd['state']) == len(list(m.parameters())) and len(sd['param_groups']) == 3
    again = make_optimizer(tiny(n_embd=32, n_head=2), 0.0, 1e-3, (0.9, 0.95), 'cpu', 'muon')
    again.load_state_dict(sd)
    for a, b in zip(again.state_dict()['state'].values(), sd['state'].values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# one setting for every Muon run here: 30 iterations of 2 micro-steps, on the blocks of n_embd 32
ARGS = [*TINY, '--optimizer=muon', '--muon_learning_rate=0.02', '--learning_rate=1e-2', '--min_lr=1e-3',
        '--warmup_iters=4', '--lr_decay_iters=30', '--eval_interval=6', '--n_embd=32',
        '--gradient_accumulation_steps=2', '--max_iters=30']


@pytest.fixture(scope='module')
def straight(repo):  # noqa: F811
    """ARGS in one process, uninterrupted (out-m30): the run AdamW's is compared with, a resumed run and 2
    processes must equal. Its losses {iter: loss}."""
    return logged(run(repo, 'train.py', *ARGS, '--out_dir=out-m30').stdout, 'loss')


def test_muon_learns_like_adamw(repo, straight):
    """On the same 30 batches, Muon's loss falls at least as far as AdamW's (both at their usual rates), and
    further than with the blocks' matrices left still (muon_learning_rate=0: AdamW's embeddings learn alone,
    which on this 1-layer model is most of the learning: 3.155 then, 3.083 with Muon, measured), so that a
    Muon step in a wrong direction shows."""
    muon = straight
    adamw = logged(run(repo, 'train.py', *ARGS, '--optimizer=adamw', '--out_dir=out-adamw-learns').stdout, 'loss')
    still = logged(run(repo, 'train.py', *ARGS, '--muon_learning_rate=0', '--out_dir=out-muon-still').stdout, 'loss')
    last = lambda losses: sum(losses[i] for i in range(25, 30)) / 5
    assert last(adamw) < losses_at_start(adamw) - 0.5  # AdamW learned: the comparison means something
    assert last(muon) < last(adamw) + 0.05, (last(muon), last(adamw))
    assert last(muon) < last(still) - 0.035, (last(muon), last(still))


def losses_at_start(losses):
    return sum(losses[i] for i in range(3)) / 3


def test_muon_resume_is_bit_identical(repo, straight):
    """12 iterations, stop, resume to 30: the same losses and weights as 30 straight (both optimizers' state)."""
    first = run(repo, 'train.py', *ARGS, '--max_iters=12', '--out_dir=out-m12')
    second = run(repo, 'train.py', *ARGS, '--out_dir=out-m12', '--init_from=resume')
    assert straight == {**logged(first.stdout, 'loss'), **logged(second.stdout, 'loss')}
    assert_same_weights(weights(repo, 'out-m30'), weights(repo, 'out-m12'))
    saved = torch.load(repo / 'out-m12' / 'last.pt', weights_only=True)['optimizer']
    assert 'momentum_buffer' in saved['state'][0] and 'exp_avg' in saved['state'][len(saved['state']) - 1]


def test_muon_two_processes_equal_one_and_fsdp_is_refused(repo, straight):
    """torchrun with 2 Gloo processes (DDP), one micro-step each, equals one process with 2 micro-steps, to 1e-6.
    Muon orthogonalises in bfloat16 and Newton-Schulz multiplies a gradient's small directions ~400x
    (3.4445^5), so a last-bit difference of the summed gradients would show: with 2 micro-steps the sum
    g0/2 + g1/2 is the same float either way, and with torchrun's one thread per process (OMP_NUM_THREADS=1,
    which conftest.py sets for every test's subprocesses) the single process computes each gradient as they do."""
    assert os.environ['OMP_NUM_THREADS'] == '1'
    torchrun(repo, *ARGS, '--out_dir=out-muon-ddp')
    a, b = weights(repo, 'out-m30'), weights(repo, 'out-muon-ddp')
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    # refused before any process group starts: one process with torchrun's variables says it
    p = subprocess.run([sys.executable, 'train.py', *ARGS, '--fsdp=True', '--out_dir=out-muon-fsdp'], cwd=repo,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, RANK='0', LOCAL_RANK='0', WORLD_SIZE='1'))
    assert_one_line_error(p, "optimizer='muon'", 'FSDP keeps only a shard', 'fsdp=False')
