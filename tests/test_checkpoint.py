"""
checkpoint.py: checkpoints loaded back into the same model (also nanoGPT's '_orig_mod.' names and a
file written before the code was split into modules), the one-call loader from every source, the
device and precision choice; and the layout: model.py imports no project file, and no file imports
in a circle or from a command (docs/design.md, Layout).
"""

import ast
import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint as C
import devices as D
from model import GPT, GPTConfig  # noqa: E402
from test_model import one_thread, random_idx, tiny  # noqa: F401 (one_thread is an autouse fixture)
from test_scripts import ROOT, TINY, logged, repo, run  # noqa: F401 (repo is a fixture)


def save_checkpoint(m, path, prefix=''):
    """A checkpoint shaped like train.py's."""
    torch.save({
        'model': {prefix + k: v for k, v in m.state_dict().items()},
        'model_args': dataclasses.asdict(m.config),
        'config': {},
        'iter_num': 0,
    }, path)


@pytest.mark.parametrize('prefix', ['', '_orig_mod.'])
def test_load_checkpoint(tmp_path, prefix):
    """load_checkpoint restores the weights (also with torch.compile's '_orig_mod.' names)."""
    m = tiny()
    path = tmp_path / 'ckpt.pt'
    save_checkpoint(m, path, prefix)
    loaded, checkpoint = C.load_checkpoint(path, 'cpu')
    loaded.eval()
    assert checkpoint['iter_num'] == 0
    assert loaded.config == m.config
    idx = random_idx()
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx, idx)[0], m(idx, idx)[0], atol=0, rtol=0)
    # the loaded model still ties its embedding and output weights
    assert loaded.transformer.wte.weight.data_ptr() == loaded.lm_head.weight.data_ptr()


def test_loading_draws_no_weights(tmp_path):
    """load_checkpoint builds the model without GPT-2's initialisation, and what nn.Linear and
    nn.Embedding draw leaves the random state as before (sample.py seeds, then loads, then draws);
    the weights are the file's tensors."""
    m = tiny()
    save_checkpoint(m, tmp_path / 'ckpt.pt')
    state = torch.get_rng_state()
    loaded, _ = C.load_checkpoint(str(tmp_path / 'ckpt.pt'), 'cpu')
    assert torch.equal(torch.get_rng_state(), state)
    assert loaded.state_dict().keys() == m.state_dict().keys()
    for name, tensor in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=65))  # (what a draw does)
    assert not torch.equal(torch.get_rng_state(), state)


def test_load_checkpoint_overrides(tmp_path):
    """Overrides such as dropout reach the loaded model's config and layers; the weights are unchanged."""
    m = tiny()
    path = tmp_path / 'ckpt.pt'
    save_checkpoint(m, path)
    loaded, _ = C.load_checkpoint(path, 'cpu', dropout=0.1, flash=False)
    assert loaded.config.dropout == 0.1 and loaded.config.flash is False
    assert loaded.transformer.drop.p == 0.1
    assert loaded.transformer.h[0].attn.dropout == 0.1 and not loaded.transformer.h[0].attn.flash
    loaded.eval()
    idx = random_idx()
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx, idx)[0], m(idx, idx)[0], atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# device and precision helpers

no_cuda = not torch.cuda.is_available()


@pytest.mark.skipif(not no_cuda or torch.backends.mps.is_available(), reason='this machine has a GPU')
def test_pick_device_auto_is_cpu_without_gpu():
    """With neither CUDA nor MPS, 'auto' means the CPU."""
    assert D.pick_device('auto') == 'cpu'
    assert D.pick_device('cpu') == 'cpu'


@pytest.mark.skipif(not no_cuda, reason='CUDA is available here')
def test_pick_device_cuda_unavailable():
    """Asking for CUDA on a machine without it is refused with the devices that do exist."""
    with pytest.raises(ValueError) as excinfo:
        D.pick_device('cuda')
    message = str(excinfo.value)
    assert 'cuda' in message and 'available' in message and 'cpu' in message, message


def test_pick_dtype(monkeypatch):
    """'auto' on the CPU is bfloat16 where the processor has native bf16 matmuls, float32
    elsewhere (there CPU autocast is slower than float32); an explicit dtype is kept; an
    unknown one is refused by name."""
    for native, expected in ((True, 'bfloat16'), (False, 'float32')):
        monkeypatch.setattr(D, 'cpu_has_bf16', lambda: native)
        assert D.pick_dtype('auto', 'cpu') == expected
        assert D.pick_dtype('auto', 'mps') == 'float32'
    for dtype in ('float32', 'bfloat16', 'float16'):
        assert D.pick_dtype(dtype, 'cpu') == dtype
    with pytest.raises(ValueError, match='float8'):
        D.pick_dtype('float8', 'cpu')


# -----------------------------------------------------------------------------
# a checkpoint written by the code before it was split into modules (commit 079e91b): train.py with
# --n_layer=1 --n_head=2 --n_embd=16 --block_size=16 --batch_size=4 --rope=True --rmsnorm=True
# --bias=False --dropout=0.1 --learning_rate=1e-2 --decay_lr=False --max_iters=4 (last.pt at iteration 4).
# That code, resumed to 6 iterations, logged these losses (its log.jsonl); sampling gave these texts.
# Since issue 18 the dropout masks come from a seed per micro-step and loading builds the model on the meta
# device, drawing no random numbers; since issue 14 the windows of every batch, and those seeds, are drawn by
# batches.mix64. So the greedy text is still the old code's (the weights are the same), while the sampled text
# and the losses and val losses after the resume are this code's (the old code's: 3.8132057189941406,
# 3.6326351165771484; val 3.9245657920837402, 3.849414587020874; text 'ROMEO:YRLZL&KMG-:$frHsxuOjOu.\nEEVCCe').
OLD = os.path.join(ROOT, 'tests', 'fixtures', 'ckpt_before_modules.pt')
OLD_FLAGS = [*TINY, '--rope=True', '--rmsnorm=True', '--bias=False', '--dropout=0.1', '--learning_rate=1e-2',
             '--decay_lr=False', '--eval_interval=2', '--plot=False']
OLD_LOSSES = {4: 3.8847885131835938, 5: 3.7761878967285156}
OLD_VALS = [3.8057432174682617, 3.621567487716675]  # at 4 (the resumed run evaluates first) and 6
OLD_SAMPLES = {'0.8': "ROMEO:CpzlYaSM;czde.'wEiT,YVrzlG3-?Y", '0': 'ROMEO:' + 'X' * 30}


def test_a_checkpoint_of_the_old_code_samples_and_resumes(repo):
    """Format unchanged: the old file samples the same texts and resumes to the same losses, bit for bit."""
    os.makedirs(repo / 'out-old', exist_ok=True)
    with open(OLD, 'rb') as src, open(repo / 'out-old' / 'last.pt', 'wb') as dst:
        dst.write(src.read())
    for temperature, text in OLD_SAMPLES.items():
        p = run(repo, 'sample.py', '--out_dir=out-old', '--ckpt_name=last.pt', '--device=cpu', '--dtype=float32',
                '--max_new_tokens=30', '--num_samples=1', '--start=ROMEO:', f'--temperature={temperature}')
        assert p.stdout.split('\n---------------')[0] == text
    run(repo, 'train.py', *OLD_FLAGS, '--out_dir=out-old', '--init_from=resume', '--max_iters=6')
    records = [json.loads(line) for line in (repo / 'out-old' / 'log.jsonl').read_text().splitlines()]
    assert {r['iter']: r['loss'] for r in records if 'loss' in r} == OLD_LOSSES
    # (the evaluation is a mean over all targets since chat masks came, not a mean of batch means: the same
    # number summed in another order, so its last bits may differ)
    assert [r['val_loss'] for r in records if 'val_loss' in r] == pytest.approx(OLD_VALS, abs=1e-6)


# -----------------------------------------------------------------------------
# load_model: a ready model and its tokenizer from each kind of source


def test_load_model_from_a_folder_a_file_and_last_pt(repo, capsys, monkeypatch):
    """A run's folder (its ckpt.pt, else last.pt), a checkpoint file: the same weights, in eval mode,
    with the dataset's tokenizer; a missing one is a one-line ValueError naming the path."""
    run(repo, 'train.py', *TINY, '--max_iters=2', '--out_dir=out-load')
    os.remove(repo / 'out-load' / 'ckpt.pt')  # as if stopped before its first evaluation
    monkeypatch.setattr(C, 'DATA_DIR', str(repo / 'data'))  # the copy's prepared data
    model, tok, ckpt = C.load_model(str(repo / 'out-load'))
    assert 'no ckpt.pt yet' in capsys.readouterr().out and ckpt['iter_num'] == 2  # last.pt
    assert not model.training and tok.n_vocab == 65 and tok.decode(tok.encode('ROMEO:')) == 'ROMEO:'
    same, _, _ = C.load_model(str(repo / 'out-load' / 'last.pt'))
    for a, b in zip(model.state_dict().values(), same.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match='no checkpoint at .*out-none.*ckpt.pt'):
        C.load_model(str(repo / 'out-none'))


# -----------------------------------------------------------------------------
# the layout: one room per idea, imports pointing down


PROJECT = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith('.py') and not f.startswith('test_')
                 and f != 'conftest.py')
MODULES = {'model', 'configurator', 'tokenizer', 'batches', 'devices', 'checkpoint', 'scoring', 'plot',
           'downloads', 'hf_models', 'muon', 'memory', 'conversations', 'lora', 'dpo', 'gguf_export',
           'side_by_side'}  # plot.py: a command train.py imports too


def imports_of(name):
    """The project files a file imports, at the top or inside a function (ast: the file is not run)."""
    with open(os.path.join(ROOT, name + '.py'), encoding='utf-8') as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split('.')[0])
    return found & set(PROJECT)


def test_model_py_imports_no_project_file():
    """python -c 'import model' loads no other file of this project."""
    code = f"import sys, model; print(sorted(m for m in sys.modules if m in {PROJECT!r} and m != 'model'))"
    p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert p.stdout.strip() == '[]'
    assert imports_of('model') == set()


def test_no_import_cycle_and_modules_import_no_command():
    graph = {name: imports_of(name) - {name} for name in PROJECT}
    assert graph['tokenizer'] <= set() and graph['devices'] <= set() and graph['muon'] <= set()
    assert graph['batches'] <= {'tokenizer'} and graph['memory'] <= set()
    assert graph['checkpoint'] <= {'model', 'tokenizer', 'devices', 'downloads', 'hf_models', 'memory',
                                   'lora'}
    assert graph['lora'] <= set() and graph['gguf_export'] <= set()
    for name in MODULES:
        assert graph[name] <= MODULES, f"{name}.py imports a command: {graph[name] - MODULES}"
    state = {}  # depth-first search: 1 on the current path, 2 done

    def visit(name, path):
        assert state.get(name) != 1, f"import cycle: {' -> '.join(path + [name])}"
        if state.get(name) is None:
            state[name] = 1
            for dep in sorted(graph[name]):
                visit(dep, path + [name])
            state[name] = 2
    for name in PROJECT:
        visit(name, [])


@pytest.mark.parametrize('name', sorted(MODULES | {'prepare', 'export_hf'}))
def test_each_module_imports_alone(name):
    """Each file other files import (and the commands whose script part is under __main__) imports in a fresh
    interpreter and only defines things. (train.py, sample.py and bench.py run when imported: the tests run
    them as subprocesses.)"""
    p = subprocess.run([sys.executable, '-c', f'import {name}'], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == '', p.stderr


# -----------------------------------------------------------------------------
# the attention path train.py picks, and checkpoints nanoGPT reads

# a checkout of karpathy/nanoGPT: the shared/ folder beside this one holds it, or NANOGPT=PATH
NANOGPT = os.path.abspath(os.environ.get('NANOGPT', os.path.join(ROOT, '..', 'shared', 'anchors', 'nanoGPT')))


def test_pick_flash():
    """'auto': the written-out attention under CPU bfloat16 autocast only; True and False (or their strings) force."""
    assert D.pick_flash('auto', 'cpu', 'bfloat16') is False
    assert D.pick_flash('auto', 'cpu', 'float32') is True
    assert D.pick_flash('auto', 'cuda:1', 'bfloat16') is True
    assert D.pick_flash('True', 'cpu', 'bfloat16') is True and D.pick_flash(False, 'cuda', 'float16') is False
    with pytest.raises(ValueError, match="'fast'"):
        D.pick_flash('fast', 'cpu', 'float32')


@pytest.mark.parametrize('dtype, flash', [('bfloat16', False), ('float32', True)])
def test_the_flash_choice_is_what_the_log_prints(repo, dtype, flash):
    """The attention path train.py logs is the one the model runs and the checkpoint records; on a CPU
    the log shows tokens/s but no MFU (there is no peak to measure it against)."""
    out = f'out-flash-{dtype}'
    p = run(repo, 'train.py', *TINY, f'--dtype={dtype}', '--max_iters=1', '--eval_interval=1', f'--out_dir={out}')
    assert f'dtype {dtype}, flash={flash},' in p.stdout
    assert 'tok/s' in p.stdout and 'mfu' not in p.stdout  # no peak figure for a CPU: tokens/s only
    ckpt = torch.load(repo / out / 'last.pt', weights_only=True)
    assert ckpt['arch']['flash'] is flash and ckpt['config']['flash'] is flash
    model, _ = C.load_checkpoint(repo / out / 'last.pt', 'cpu')
    assert model.transformer.h[0].attn.flash is flash


def test_model_args_are_nanogpts_and_nanogpt_samples_ours(repo, tmp_path):
    """A GPT-2-style checkpoint's model_args has exactly the fields of nanoGPT's GPTConfig (read from its
    model.py where a checkout is at hand, else the 7 it has had since 2023); our settings are in 'arch' and
    come back on load. nanoGPT's own sample.py, run from a copy of its checkout, loads the file and samples."""
    run(repo, 'train.py', *TINY, '--max_iters=2', '--eval_interval=2', '--out_dir=out-nano', '--flash=False')
    ckpt = torch.load(repo / 'out-nano' / 'ckpt.pt', weights_only=True)
    fields = {'n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout'}
    if os.path.isdir(NANOGPT):
        tree = ast.parse(open(os.path.join(NANOGPT, 'model.py'), encoding='utf-8').read())
        cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == 'GPTConfig')
        fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    assert set(ckpt['model_args']) == fields
    assert ckpt['arch']['flash'] is False and ckpt['arch']['rope'] is False
    model, _ = C.load_checkpoint(repo / 'out-nano' / 'ckpt.pt', 'cpu')
    assert model.config.flash is False and model.config.n_embd == 16
    if not os.path.isdir(NANOGPT):
        return
    nano = tmp_path / 'nanoGPT'
    shutil.copytree(NANOGPT, nano)
    meta = json.loads((repo / 'data' / 'shakespeare_char' / 'meta.json').read_text())
    chars = meta['tokenizer']['chars']
    os.makedirs(nano / 'data' / 'shakespeare_char', exist_ok=True)
    with open(nano / 'data' / 'shakespeare_char' / 'meta.pkl', 'wb') as f:  # what nanoGPT's prepare.py writes
        pickle.dump({'vocab_size': len(chars), 'itos': dict(enumerate(chars)),
                     'stoi': {c: i for i, c in enumerate(chars)}}, f)
    p = subprocess.run([sys.executable, 'sample.py', f'--out_dir={repo / "out-nano"}', '--device=cpu',
                        '--num_samples=1', '--max_new_tokens=20', '--start=ROMEO:'], cwd=nano,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert 'Loading meta from' in p.stdout and '\nROMEO:' in p.stdout  # its meta.pkl, then the sample
