"""
The machines people have, on this CPU: the choices a GPU, Windows or macOS would make (their queries
stubbed), FSDP with float16 under 2 Gloo processes, per-rank dropout masks, the README's multi-node
commands against the setting checks, sampling without the optimizer's state in memory, a failing
compile, bench.py without /proc/stat. docs/devices.md says what each guards.
"""

import ast
import contextlib
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

import batches as B
import checkpoint as C
import devices as D
from model import GPT, GPTConfig
from test_resume import assert_same_weights, torchrun, weights
from test_scripts import ROOT, TINY, assert_one_line_error, logged, repo  # noqa: F401 (repo is a fixture)


# -----------------------------------------------------------------------------
# precision, compile and backend choices for a given GPU (torch's answers stubbed)

def stub_gpu(monkeypatch, capability, new_torch=True):
    """torch.cuda as on a GPU of this compute capability; is_bf16_supported as PyTorch's: True for an
    emulated bf16 too, unless including_emulation=False (2.3+), which older versions do not take."""
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    if new_torch:
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported',
                            lambda including_emulation=True: capability >= (8, 0) or including_emulation)
    else:
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: True)


@pytest.mark.parametrize('new_torch', [True, False])
@pytest.mark.parametrize('capability, want', [((7, 0), 'float16'), ((7, 5), 'float16'), ((8, 0), 'bfloat16'),
                                              ((9, 0), 'bfloat16')])
def test_dtype_auto_is_bf16_only_where_native(monkeypatch, capability, want, new_torch):
    """V100 (7.0) and T4 (7.5) emulate bf16: float16 with a GradScaler; A100 (8.0), H100 (9.0): bfloat16."""
    stub_gpu(monkeypatch, capability, new_torch)
    assert D.pick_dtype('auto', 'cuda:0') == want
    assert D.pick_dtype('float32', 'cuda:0') == 'float32'


def test_compile_and_backend_choices():
    # compile='auto': CUDA with Triton on Volta or newer only
    assert D.pick_compile('auto', 'cuda:0', capability=(8, 0), triton=True) is True
    assert D.pick_compile('auto', 'cuda:0', capability=(7, 0), triton=True) is True
    assert D.pick_compile('auto', 'cuda:0', capability=(6, 1), triton=True) is False  # Pascal: GPUTooOldForTriton
    assert D.pick_compile('auto', 'cuda:0', capability=(8, 9), triton=False) is False  # Windows: no Triton
    assert D.pick_compile('auto', 'cpu') is False and D.pick_compile('auto', 'mps') is False
    assert D.pick_compile(True, 'cpu') is True and D.pick_compile('False', 'cuda', (9, 0), True) is False
    with pytest.raises(ValueError, match="compile must be 'auto', True or False"):
        D.pick_compile('maybe', 'cpu')


def test_more_processes_than_gpus_is_one_line():
    with pytest.raises(ValueError, match=r"process 2 of this machine has no GPU: 2 visible .*--nproc_per_node=2"):
        D.use_device('cuda', local_rank=2, gpus=2)
    with pytest.raises(ValueError, match=r"device 'cuda:1' does not exist: 1 GPU"):
        D.use_device('cuda:1', gpus=1)
    assert D.use_device('cpu', local_rank=5, gpus=0) == 'cpu'


@pytest.mark.parametrize('name, tflops', [
    ('NVIDIA H100 80GB HBM3', 989), ('NVIDIA H100 PCIe', 756), ('NVIDIA H100 NVL', 835), ('NVIDIA H200', 989),
    ('NVIDIA H200 NVL', 835), ('NVIDIA GH200 480GB', 989), ('NVIDIA B200', 2250), ('NVIDIA L40S', 362),
    ('NVIDIA A10', 125), ('NVIDIA A10G', 125), ('NVIDIA L4', 121), ('NVIDIA A100-SXM4-80GB', 312),
    ('Tesla V100-SXM2-16GB', 125), ('Tesla T4', 65)])
def test_peak_flops_by_name(name, tflops):
    flops, label = D.peak_flops_of(name)
    assert flops == tflops * 1e12, label
    assert D.peak_flops_of('NVIDIA GeForce GTX 1080') is None


# -----------------------------------------------------------------------------
# compile that fails: one line, then the run goes on uncompiled

def test_a_failing_compile_falls_back_to_eager():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=65, dropout=0.1))
    batch = torch.randint(0, 65, (2, 8)), torch.randint(0, 65, (2, 8))

    def broken(gm, example_inputs):  # what inductor does on a GPU it does not support
        raise RuntimeError("GPUTooOldForTriton: Found Tesla P100 which is too old to be supported\nmore")

    lines = []
    state = torch.get_rng_state()
    assert D.compile_checked(model, batch, contextlib.nullcontext(), lines.append,
                             backend=broken) is model
    assert len(lines) == 1 and 'GPUTooOldForTriton' in lines[0] and 'without it' in lines[0], lines
    assert torch.equal(torch.get_rng_state(), state)  # the trial's dropout left no trace
    assert all(p.grad is None for p in model.parameters())
    works = D.compile_checked(model, batch, contextlib.nullcontext(), lines.append, backend='eager')
    assert works is not model and len(lines) == 1
    model.eval()  # no dropout: the compiled model computes the same loss
    torch.testing.assert_close(works(*batch)[1], model(*batch)[1])


# -----------------------------------------------------------------------------
# distributed: the README's commands, FSDP + float16, dropout per rank, a rank's error

def readme_torchrun_commands():
    """(processes, config files, flags) of each torchrun line in README.md's code."""
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        lines = [line.split('#')[0] for line in f.read().splitlines() if line.startswith('torchrun ')]
    commands = []
    for line in lines:
        words = shlex.split(line)
        script = words.index('train.py')
        opts = dict(w[2:].split('=', 1) for w in words[1:script] if w.startswith('--') and '=' in w)
        processes = int(opts.get('nnodes', 1)) * int(opts['nproc_per_node'])
        args = words[script + 1:]
        commands.append((processes, [a for a in args if not a.startswith('--')],
                         dict(a[2:].split('=', 1) for a in args if a.startswith('--'))))
    return commands


def test_readme_torchrun_commands_pass_the_setting_checks():
    with open(os.path.join(ROOT, 'train.py'), encoding='utf-8') as f:
        default = next(ast.literal_eval(n.value) for n in ast.parse(f.read()).body if isinstance(n, ast.Assign)
                       and getattr(n.targets[0], 'id', '') == 'gradient_accumulation_steps')
    commands = readme_torchrun_commands()
    assert {p for p, _, _ in commands} >= {8, 16}, commands  # one machine of 8, two of 8
    for processes, files, flags in commands:
        scope = {}
        for path in files:
            with open(os.path.join(ROOT, path), encoding='utf-8') as f:
                exec(compile(f.read(), path, 'exec'), scope)
        steps = int(flags.get('gradient_accumulation_steps', scope.get('gradient_accumulation_steps', default)))
        assert steps % processes == 0, (steps, processes)  # what train.py checks first


def test_fsdp_float16_with_grad_clip_trains_and_resumes(repo):
    """FSDP's ShardedGradScaler with the fused AdamW failed at the first step (PyTorch issue 140514)."""
    args = [*TINY, '--fsdp=True', '--dtype=float16', '--grad_clip=1.0', '--gradient_accumulation_steps=2',
            '--dropout=0.1', '--eval_interval=2', '--learning_rate=1e-3', '--plot=False']
    straight = torchrun(repo, *args, '--max_iters=4', '--out_dir=out-f16')
    assert sorted(logged(straight.stdout, 'loss')) == list(range(4))
    torchrun(repo, *args, '--max_iters=2', '--out_dir=out-f16-r')
    torchrun(repo, *args, '--max_iters=4', '--out_dir=out-f16-r', '--init_from=resume')
    assert_same_weights(weights(repo, 'out-f16'), weights(repo, 'out-f16-r'))
    scaler = torch.load(repo / 'out-f16' / 'last.pt', weights_only=True)['scaler']
    assert scaler['scale'] > 0 and scaler == torch.load(repo / 'out-f16-r' / 'last.pt', weights_only=True)['scaler']


def test_dropout_masks_differ_across_ranks():
    """Each global micro-step has its own dropout seed: rank 1's masks are not rank 0's. That 2 processes
    therefore draw what 1 process draws for the same micro-steps, and with dropout still train the same model,
    is checked where 2 processes are compared with 1 (test_resume.py::test_two_processes_equal_one, dropout 0.3)."""
    seeds = {B.step_seed(1337, it, m) for it in range(3) for m in range(4)}
    assert len(seeds) == 12


def test_batches_are_drawn_by_splitmix64():
    """batches.mix64 folds with splitmix64's finaliser: from state 0, SplitMix64 (Steele, Lea and Flood 2014;
    Vigna's splitmix64.c) gives 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4, 0x06c45d188009454f. draw, where a
    batch's windows start, differs between streams, stays in range, and is even (a chi-square test)."""
    golden = 0x9E3779B97F4A7C15  # SplitMix64's increment
    assert [B.mix64(0, k * golden % 2**64) for k in range(3)] == [0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4,
                                                                   0x06c45d188009454f]
    assert B.draw((1337, 0, 5, 1), 12, 1000) != B.draw((1337, 0, 5, 2), 12, 1000)
    assert {i for it in range(100) for i in B.draw((1337, 0, it, 0), 12, 7)} == set(range(7))  # 0 ... high - 1
    counts = np.bincount([i for it in range(1000) for i in B.draw((1337, 0, it, 0), 12, 10)], minlength=10)
    assert len(counts) == 10 and ((counts - 1200) ** 2 / 1200).sum() < 27.9  # the 0.1 % tail at 9 degrees of freedom


def test_a_debugger_or_profiler_keeps_the_process_after_the_run(repo, tmp_path):
    """A run ends as a script does: pdb gets to say the program finished, cProfile writes its file."""
    args = ['train.py', *TINY, '--max_iters=1', '--eval_interval=1']
    p = subprocess.run([sys.executable, '-m', 'pdb', *args, '--out_dir=out-pdb'], input='c\nq\n', cwd=repo,
                       capture_output=True, text=True, timeout=300)
    assert 'The program finished and will be restarted' in p.stdout, p.stdout + p.stderr
    prof = tmp_path / 'train.prof'
    subprocess.run([sys.executable, '-m', 'cProfile', '-o', str(prof), *args, '--out_dir=out-prof'], cwd=repo,
                   check=True, capture_output=True, timeout=300)
    assert prof.stat().st_size > 0


def test_a_non_master_rank_failure_names_the_rank(repo):
    """A rank other than 0 that finds a problem (a file only node 0 has...) says so in one line."""
    env = dict(os.environ, RANK='1', LOCAL_RANK='1', WORLD_SIZE='2')
    p = subprocess.run([sys.executable, 'train.py', *TINY, '--gradient_accumulation_steps=3', '--out_dir=out-rank'],
                       cwd=repo, capture_output=True, text=True, timeout=300, env=env)
    assert_one_line_error(p, '(rank 1)', 'gradient_accumulation_steps 3 is not divisible by the 2 processes')


# -----------------------------------------------------------------------------
# loading: the weights alone reach memory

MEASURE = """
import sys, torch, checkpoint
from model import GPT, GPTConfig
with torch.device('meta'):  # first uses page in torch's own code (~80 MB of libraries): done before measuring
    GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=8))
torch.zeros(8).max()
def status(key):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ':'))
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # resets the peak (VmHWM) to the resident memory now: what follows is measured alone
base = status('VmRSS')
model, tok, ckpt = checkpoint.load_model(sys.argv[1], 'cpu')
for p in model.parameters():
    p.max()  # every weight read (the pages of a mapped file count once read)
print(status('VmHWM') - base, sorted(ckpt))
"""


def test_sampling_never_reads_the_optimizer_state(repo, tmp_path):
    """A checkpoint of ~100 MB of weights and 200 MB of Adam moments: load_model (sample.py, export_hf.py)
    peaks below the weights + 10 %. Resident memory (VmHWM, reset just before) counts what torch allocates
    and the pages of a mapped file it reads, which tracemalloc or a Python-level count would not see."""
    config = GPTConfig(n_layer=2, n_head=8, n_embd=1024, block_size=64, vocab_size=65)
    with torch.device('meta'):
        shapes = GPT(config).state_dict()
    sd = {k: torch.zeros(v.shape) for k, v in shapes.items()}
    sd['lm_head.weight'] = sd['transformer.wte.weight']  # tied, as train.py saves it
    params = list(dict.fromkeys(sd.values()))  # each tensor once
    size = sum(p.numel() * 4 for p in params)
    assert 95e6 < size < 110e6
    state = {i: {'step': torch.tensor(1.0), 'exp_avg': torch.zeros_like(p), 'exp_avg_sq': torch.zeros_like(p)}
             for i, p in enumerate(params)}
    path = tmp_path / 'ckpt.pt'
    torch.save(dict(model=sd, optimizer=dict(state=state, param_groups=[dict(params=list(state))]),
                    model_args=dict(vars(config)), iter_num=1, best_val_loss=1.0,
                    config=dict(dataset='shakespeare_char')), path)
    del sd, state, params
    p = subprocess.run([sys.executable, '-c', MEASURE, str(path)], cwd=repo, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    peak, keys = p.stdout.split(' ', 1)
    assert 'optimizer' not in keys
    assert 0.9 * size < int(peak) < 1.1 * size, (int(peak) / 1e6, size / 1e6)  # the weights were read, once


# -----------------------------------------------------------------------------
# bench.py off Linux

def test_bench_runs_without_proc_stat(repo):
    """macOS and Windows have no /proc/stat: the load of other processes is said to be unmeasured."""
    code = ("import builtins, runpy, sys\n"
            "real = builtins.open\n"
            "def fake(path, *a, **k):\n"
            "    if str(path).startswith('/proc/stat'):\n"
            "        raise FileNotFoundError(2, 'No such file or directory', path)\n"
            "    return real(path, *a, **k)\n"
            "builtins.open = fake\n"
            "sys.argv = ['bench.py'] + sys.argv[1:]\n"
            "runpy.run_path('bench.py', run_name='__main__')\n")
    p = subprocess.run([sys.executable, '-c', code, '--mode=train', '--variants=plain', '--rounds=1', '--iters=1',
                        '--warmup=1', '--device=cpu'], cwd=repo, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert 'not measured here (no /proc/stat)' in p.stdout and '--device=cpu' in p.stdout
