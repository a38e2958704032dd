"""
The real scripts, run as subprocesses the way a user runs them, on a copy of the repository
in a temporary folder: prepare -> train -> resume -> sample, the learning-rate schedule as
train.py logs it, the known token ids, and the one-line answers to bad input.
"""

import hashlib
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from test_forkserver import ScriptRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

# a model small enough that a few iterations take a second
TINY = ['--dataset=shakespeare_char', '--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=16',
        '--batch_size=4', '--gradient_accumulation_steps=1', '--eval_iters=2', '--log_interval=1', '--device=cpu',
        '--dtype=float32', '--plot=False']  # drawing loss.png costs ~0.4 s an evaluation: the tests that check it ask for it
# learning-rate schedule: warmup over 2 steps to 1e-2, cosine down to 1e-3 at step 5
SCHEDULE = ['--learning_rate=1e-2', '--min_lr=1e-3', '--warmup_iters=2', '--lr_decay_iters=5']


RUNNER = ScriptRunner()  # python <script> in a process forked from one with torch imported (test_forkserver.py)


def run(repo, script, *args, ok=True):
    """Run python <script> <args> in repo; return the CompletedProcess (asserting success if ok)."""
    p = RUNNER.run(repo, script, args, timeout=300)
    if ok:
        assert p.returncode == 0, f"{script} {args} failed:\n{p.stdout}\n{p.stderr}"
    return p


def assert_one_line_error(p, *fragments):
    """A user's mistake: exit status 1, exactly one line on stderr naming the problem, no traceback."""
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in p.stderr, p.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def copy_scripts(dst):
    """The repository's scripts, config/ and data/gpt2.tiktoken copied into the folder dst (no dataset); dst."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(ROOT):
        if name.endswith('.py'):
            shutil.copy(os.path.join(ROOT, name), dst)
    shutil.copytree(os.path.join(ROOT, 'config'), dst / 'config')
    (dst / 'data').mkdir()
    shutil.copy(os.path.join(ROOT, 'data', 'gpt2.tiktoken'), dst / 'data')
    return dst


@pytest.fixture(scope='module')
def repo(tmp_path_factory):
    """A fresh copy of the repository's scripts and committed data, with shakespeare_char prepared."""
    dst = copy_scripts(tmp_path_factory.mktemp('repo'))
    os.makedirs(dst / 'data' / 'shakespeare_char')
    shutil.copy(os.path.join(ROOT, 'data', 'shakespeare_char', 'input.txt'), dst / 'data' / 'shakespeare_char')
    run(dst, 'prepare.py', 'shakespeare_char')
    return dst


def logged(stdout, what):
    """{iter: value} of a quantity in train.py's 'iter N: loss L, lr R, ...' lines."""
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(rf"iter (\d+): .*?{what} ([0-9.e+-]+)", stdout)}


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_prepare_shakespeare_char_counts_and_reproducibility(repo):
    """Known values (vocab 65, 1,003,854 / 111,540 tokens), ids that decode back to the text,
    and a second run writes byte-identical files."""
    data = repo / 'data' / 'shakespeare_char'
    meta = json.loads((data / 'meta.json').read_text(encoding='utf-8'))
    assert (meta['vocab_size'], meta['train_tokens'], meta['val_tokens'], meta['dtype']) == (65, 1003854, 111540, 'uint16')
    text = (data / 'input.txt').read_text(encoding='utf-8')
    train = np.fromfile(data / 'train.bin', dtype=np.uint16)
    assert ''.join(meta['tokenizer']['chars'][i] for i in train[:1000]) == text[:1000]
    before = {f: sha256(data / f) for f in ('train.bin', 'val.bin', 'meta.json')}
    run(repo, 'prepare.py', 'shakespeare_char')
    assert before == {f: sha256(data / f) for f in ('train.bin', 'val.bin', 'meta.json')}
    assert not [f for f in os.listdir(data) if f.endswith('.tmp')]


def test_prepare_shakespeare_gpt2_offline(repo):
    """GPT-2 BPE from the committed file (no network): nanoGPT's published counts, 301,966 train
    and 36,059 val tokens, and the known ids of the first 100 characters."""
    run(repo, 'prepare.py', 'shakespeare')
    meta = json.loads((repo / 'data' / 'shakespeare' / 'meta.json').read_text())
    # one document: no end-of-text token is added, so the counts are nanoGPT's
    assert (meta['vocab_size'], meta['train_tokens'], meta['val_tokens'], meta['eot_id']) == (50257, 301966, 36059, None)
    train = np.fromfile(repo / 'data' / 'shakespeare' / 'train.bin', dtype=np.uint16)
    assert train[:31].tolist() == [5962, 22307, 25, 198, 8421, 356, 5120, 597, 2252, 11, 3285, 502, 2740, 13, 198,
                                   198, 3237, 25, 198, 5248, 461, 11, 2740, 13, 198, 198, 5962, 22307, 25, 198, 1639]


def test_gpt2_encoding_known_ids():
    """The encoding built from data/gpt2.tiktoken gives OpenAI's ids."""
    sys.path.insert(0, ROOT)
    from tokenizer import gpt2_encoding
    enc = gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special='all') == [50256]
    assert enc.n_vocab == 50257
    assert enc.decode([15496, 995]) == "Hello world"


def test_learning_rate_schedule(repo):
    """The lr train.py uses at each step, against values worked out by hand: warmup from
    lr/(warmup+1), the peak at the end of warmup, the cosine, min_lr at lr_decay_iters and after."""
    p = run(repo, 'train.py', *TINY, *SCHEDULE, '--max_iters=7', '--eval_interval=100', '--out_dir=out-lr')
    lr = logged(p.stdout, 'lr')
    expected = {
        0: 1e-2 * 1 / 3,  # warmup start: not zero
        1: 1e-2 * 2 / 3,
        2: 1e-2,  # end of warmup: the peak
        3: 1e-3 + 0.5 * (1 + math.cos(math.pi * 1 / 3)) * 9e-3,  # a third of the way down the cosine
        4: 1e-3 + 0.5 * (1 + math.cos(math.pi * 2 / 3)) * 9e-3,
        5: 1e-3,  # lr_decay_iters: min_lr
        6: 1e-3,  # beyond: min_lr
    }
    assert lr.keys() == expected.keys()
    for it, want in expected.items():
        assert lr[it] == pytest.approx(want, rel=1e-4), it


def test_train_resume_sample(repo):
    """6 steps straight and 3 steps + resume to 6 give the same losses at every step and
    bitwise-equal weights; the checkpoint samples text that starts with the prompt."""
    common = [*TINY, *SCHEDULE, '--eval_interval=3', '--dropout=0.1', '--gradient_accumulation_steps=2']
    straight = run(repo, 'train.py', *common, '--max_iters=6', '--out_dir=out-straight')
    first = run(repo, 'train.py', *common, '--max_iters=3', '--out_dir=out-resumed')
    second = run(repo, 'train.py', *common, '--max_iters=6', '--out_dir=out-resumed', '--init_from=resume')
    assert 'resuming from' in second.stdout

    losses = logged(straight.stdout, 'loss')
    assert sorted(losses) == list(range(6))
    assert losses == {**logged(first.stdout, 'loss'), **logged(second.stdout, 'loss')}
    assert min(logged(second.stdout, 'loss')) == 3  # resumed at step 3, not from 0

    a = torch.load(repo / 'out-straight' / 'ckpt.pt', weights_only=True)
    b = torch.load(repo / 'out-resumed' / 'ckpt.pt', weights_only=True)
    assert a['iter_num'] == b['iter_num'] == 6
    assert a['model'].keys() == b['model'].keys()
    assert 'transformer.h.0.attn.c_attn.weight' in a['model'] and 'lm_head.weight' in a['model']
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert not [f for f in os.listdir(repo / 'out-resumed') if f.endswith('.tmp')]

    p = run(repo, 'sample.py', '--out_dir=out-resumed', '--start=ROMEO:', '--num_samples=2',
            '--max_new_tokens=20', '--device=cpu')
    samples = p.stdout.split('---------------\n')[:2]
    assert len(samples) == 2 and all(s.startswith('ROMEO:') and len(s) == len('ROMEO:') + 20 + 1 for s in samples)
    # the same seed gives the same samples; greedy ones are the same whatever the seed
    assert run(repo, 'sample.py', '--out_dir=out-resumed', '--start=ROMEO:', '--num_samples=2',
               '--max_new_tokens=20', '--device=cpu').stdout == p.stdout
    greedy = [run(repo, 'sample.py', '--out_dir=out-resumed', '--temperature=0', '--num_samples=1',
                  '--max_new_tokens=20', f'--seed={s}').stdout for s in (1, 2)]
    assert greedy[0] == greedy[1]


def test_first_loss_is_ln_vocab_with_any_accumulation(repo):
    """At initialisation every one of the 65 characters is about equally likely, so the logged
    loss of step 0 is about ln 65 = 4.17, whether the batch comes in 1 or 4 micro-steps (the
    micro-step losses are divided by their number, so they add up to the mean)."""
    for accum in (1, 4):
        p = run(repo, 'train.py', *TINY, f'--gradient_accumulation_steps={accum}', '--max_iters=1',
                '--eval_interval=100', f'--out_dir=out-accum{accum}')
        assert logged(p.stdout, 'loss')[0] == pytest.approx(math.log(65), abs=0.05), accum


def test_targets_are_the_next_tokens(repo, tmp_path):
    """On a text that cycles through the alphabet, a model learns to predict the next letter only
    if each target is the token after its input (y[t] = x[t + 1]): greedy sampling continues it."""
    (tmp_path / 'abc.txt').write_text('abcdefghijklmnopqrstuvwxyz\n' * 3000, encoding='utf-8')
    run(repo, 'prepare.py', 'abc', f'--input={tmp_path / "abc.txt"}', '--tokenizer=char')
    run(repo, 'train.py', *TINY, '--dataset=abc', '--max_iters=60', '--eval_interval=60', '--learning_rate=1e-2',
        '--warmup_iters=0', '--batch_size=8', '--out_dir=out-abc')
    p = run(repo, 'sample.py', '--out_dir=out-abc', '--start=abc', '--temperature=0', '--num_samples=1',
            '--max_new_tokens=30')
    assert p.stdout.startswith('abcdefghijklmnopqrstuvwxyz\nabcd'), p.stdout


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_mixed_precision_on_the_cpu(repo, dtype):
    """CPU autocast in both half types; float16 goes through the GradScaler, whose state the checkpoint
    keeps and a resumed run continues from: 3 steps + resume to 5 end where 5 straight do, bit for bit,
    scaler included. The gradient is clipped after unscale_: with beta1 = 0, AdamW's exp_avg is the last
    gradient the optimizer got, whose norm is grad_clip (the scaled one's would be 65,536 times too big)."""
    common = [*TINY, f'--dtype={dtype}', '--eval_interval=3', '--beta1=0.0', '--grad_clip=0.01']
    first = run(repo, 'train.py', *common, '--max_iters=3', f'--out_dir=out-{dtype}')
    second = run(repo, 'train.py', *common, '--max_iters=5', '--init_from=resume', f'--out_dir=out-{dtype}')
    losses = {**logged(first.stdout, 'loss'), **logged(second.stdout, 'loss')}
    assert sorted(losses) == list(range(5)) and all(math.isfinite(v) and v < 4.5 for v in losses.values())
    resumed = torch.load(repo / f'out-{dtype}' / 'ckpt.pt', weights_only=True)
    assert (resumed['scaler'].get('scale', 0) > 0) == (dtype == 'float16')
    norm = torch.cat([s['exp_avg'].flatten() for s in resumed['optimizer']['state'].values()]).norm().item()
    assert norm == pytest.approx(0.01, rel=1e-4)
    if dtype == 'float16':
        straight = run(repo, 'train.py', *common, '--max_iters=5', '--out_dir=out-float16-straight')
        assert logged(straight.stdout, 'loss') == losses
        a = torch.load(repo / 'out-float16-straight' / 'ckpt.pt', weights_only=True)
        assert a['scaler'] == resumed['scaler']  # the scale, and the count of steps since it last changed
        assert all(torch.equal(a['model'][k], resumed['model'][k]) for k in a['model'])


def test_bfloat16_on_the_cpu_learns_like_float32(repo):
    """The same 40 steps on the same batches from the same weights: under bf16 autocast (both
    attention paths; dtype='auto' picks it on CPUs with native bf16) the loss falls as it does
    in float32, to within a few hundredths."""
    common = [*TINY, '--n_embd=32', '--max_iters=40', '--eval_interval=40', '--eval_iters=10', '--learning_rate=1e-2',
              '--warmup_iters=5', '--lr_decay_iters=40', '--min_lr=1e-3']
    runs = {name: run(repo, 'train.py', *common, *flags, f'--out_dir=out-{name}').stdout for name, flags in (
        ('fp32', []), ('bf16', ['--dtype=bfloat16']), ('bf16-manual', ['--dtype=bfloat16', '--flash=False']))}
    assert 'dtype bfloat16' in runs['bf16'] and 'dtype float32' in runs['fp32']
    fp32 = logged(runs['fp32'], 'loss')
    val0, val40 = (float(v) for v in re.findall(r'val loss ([0-9.]+)', runs['fp32']))
    assert val40 < val0 - 0.5  # float32 learns in these 40 steps (4.17 -> 3.56)
    for name in ('bf16', 'bf16-manual'):
        losses = logged(runs[name], 'loss')
        assert sorted(losses) == list(range(40))
        assert losses[0] == pytest.approx(fp32[0], abs=0.01)  # the same first batch through the same weights
        # training at this learning rate amplifies rounding, so steps drift apart: compare the last ten's mean
        late, late32 = (sum(x[i] for i in range(30, 40)) / 10 for x in (losses, fp32))
        val = [float(v) for v in re.findall(r'val loss ([0-9.]+)', runs[name])]
        assert late == pytest.approx(late32, abs=0.1), name  # measured: 0.03 and 0.003
        assert val == pytest.approx([val0, val40], abs=0.05), (name, val, [val0, val40])


def test_eval_only_and_checkpoint_keys(repo):
    """eval_only evaluates and writes nothing; a checkpoint keeps the keys nanoGPT's scripts read."""
    run(repo, 'train.py', *TINY, '--max_iters=2', '--eval_interval=2', '--out_dir=out-keys', '--compile=false')
    ckpt = torch.load(repo / 'out-keys' / 'ckpt.pt', weights_only=True)
    assert {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config'} <= ckpt.keys()
    assert ckpt['config']['device'] == 'cpu' and ckpt['config']['n_embd'] == 16
    assert ckpt['config']['compile'] is False  # resolved: 'auto', True, False, in either case
    before = sha256(repo / 'out-keys' / 'ckpt.pt')
    p = run(repo, 'train.py', *TINY, '--eval_only=True', '--init_from=resume', '--out_dir=out-keys')
    val = float(re.search(r"val loss ([0-9.]+)", p.stdout).group(1))
    assert val == pytest.approx(ckpt['best_val_loss'], abs=1e-4)  # the same fixed eval batches
    assert sha256(repo / 'out-keys' / 'ckpt.pt') == before


@pytest.mark.parametrize('script, args, fragments', [
    ('train.py', ['--lerning_rate=1e-3'], ["'lerning_rate'", 'learning_rate']),
    ('train.py', ['--batch_size=big'], ['batch_size', 'int']),
    ('train.py', ['config/nope.py'], ['config/nope.py', 'not found']),
    ('train.py', ['--dataset=nope'], ["python prepare.py nope"]),
    ('train.py', [*TINY, '--n_embd=30', '--n_head=4'], ['n_embd 30', 'n_head 4']),
    ('train.py', [*TINY, '--block_size=500000'], ['val split', '111,540 tokens', 'block_size']),
    ('train.py', [*TINY, '--device=cuda'], ["device 'cuda' is not available", 'cpu']),
    ('train.py', [*TINY, '--init_from=resume', '--out_dir=out-none'], ['no checkpoint', 'out-none']),
    ('train.py', [*TINY, '--eval_interval=0'], ['eval_interval', 'at least 1']),
    ('train.py', [*TINY, '--out_dir=/proc/nope'], ['cannot write', '/proc/nope']),
    ('train.py', [*TINY, '--learning_rate=-1.0'], ['learning_rate', 'negative']),
    ('train.py', [*TINY, '--dropout=1.0'], ['dropout', '[0, 1)']),
    ('train.py', [*TINY, '--n_head=0'], ['n_head', 'positive']),
    ('train.py', [*TINY, '--compile=maybe'], ["compile must be 'auto', True or False", 'maybe']),
    ('sample.py', ['--out_dir=out-none'], ['no checkpoint', 'out-none']),
    ('prepare.py', ['nope'], ['nope', 'shakespeare_char']),
    ('prepare.py', ['shakespeare_char', '--val_fraction=0'], ['--val_fraction', 'between 0 and 1', '0.0']),
])
def test_bad_input_gets_one_line(repo, script, args, fragments):
    if script == 'train.py' and '--device=cuda' in args and torch.cuda.is_available():
        pytest.skip('this machine has CUDA, so --device=cuda is valid')
    p = run(repo, script, *args, ok=False)
    if script == 'prepare.py':  # argparse: a usage line, then the error line
        assert p.returncode != 0 and 'Traceback' not in p.stderr
        assert all(f in p.stderr.strip().splitlines()[-1] for f in fragments), p.stderr
    else:
        assert_one_line_error(p, *fragments)


def test_sample_bad_prompts(repo):
    """Characters outside the char vocabulary are named; an empty prompt and bad numbers are refused."""
    run(repo, 'train.py', *TINY, '--max_iters=1', '--eval_interval=1', '--out_dir=out-prompt')
    sample = lambda *a: run(repo, 'sample.py', '--out_dir=out-prompt', '--max_new_tokens=5', *a, ok=False)
    assert_one_line_error(sample('--start=Été 中'), "'中'", "'É'", "'é'")
    assert_one_line_error(sample('--start='), 'empty')
    assert_one_line_error(sample('--max_new_tokens=0'), 'max_new_tokens')
    assert_one_line_error(sample('--temperature=-1'), 'temperature')
    assert_one_line_error(sample('--top_k=-1'), 'top_k')
    assert_one_line_error(sample('--block_size=17'), 'block_size 17', "model's 16")
    p = sample('--top_k=1000', '--num_samples=1')  # larger than the vocabulary: all 65 kept
    assert p.returncode == 0 and len(p.stdout.split('---------------')[0]) == 1 + 5 + 1
    assert_one_line_error(sample('--num_samples=0'), 'num_samples')
    (repo / 'latin1.txt').write_bytes('Ren\u00e9e'.encode('latin-1'))
    assert_one_line_error(sample('--start=FILE:latin1.txt'), 'latin1.txt', 'not UTF-8', 'offset 3')
    p = sample('--start=' + 'a' * 40)  # longer than block_size 16: said once, then cropped
    assert p.returncode == 0 and p.stdout.count('the model sees only the last 16') == 1


class Payload:
    """An object whose unpickling would create a file: what a malicious checkpoint carries."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_broken_foreign_and_malicious_checkpoints(repo, tmp_path):
    """Resuming on a dataset of another vocabulary, a truncated file, a foreign file, and a
    file built to run code when unpickled: one line each, and the code never runs."""
    run(repo, 'train.py', *TINY, '--max_iters=1', '--eval_interval=1', '--out_dir=out-broken')
    out = repo / 'out-broken'
    (tmp_path / 'digits.txt').write_text('0123456789' * 300, encoding='utf-8')
    run(repo, 'prepare.py', 'digits', f'--input={tmp_path / "digits.txt"}', '--tokenizer=char')
    p = run(repo, 'train.py', *TINY, '--dataset=digits', '--init_from=resume', '--out_dir=out-broken', ok=False)
    assert_one_line_error(p, 'vocab_size = 65', 'vocab_size = 10', '--dataset=shakespeare_char')
    good = (out / 'last.pt').read_bytes()
    marker = tmp_path / 'pwned'
    torch.save({'model': Payload(str(marker)), 'model_args': {}, 'iter_num': 0}, tmp_path / 'evil.pt')
    torch.save({'weights': torch.zeros(3)}, tmp_path / 'foreign.pt')
    for bad, fragment in ((good[:1000], 'cannot load checkpoint'), ((tmp_path / 'foreign.pt').read_bytes(), "no 'model'"),
                          ((tmp_path / 'evil.pt').read_bytes(), 'cannot load checkpoint')):
        for name in ('last.pt', 'ckpt.pt'):
            (out / name).write_bytes(bad)
        for script, args in (('train.py', [*TINY, '--init_from=resume', '--max_iters=2']), ('sample.py', [])):
            p = run(repo, script, *args, '--out_dir=out-broken', ok=False)
            assert_one_line_error(p, fragment, '.pt')
    assert not marker.exists()  # weights_only=True: the payload was refused, not run
    pickle_ok = tmp_path / 'control.pt'  # the control: plain unpickling does run it
    torch.save(Payload(str(marker)), pickle_ok)
    torch.load(pickle_ok, weights_only=False)
    assert marker.exists()


def test_missing_bin_file(repo, tmp_path):
    (tmp_path / 'digits.txt').write_text('0123456789' * 300, encoding='utf-8')
    run(repo, 'prepare.py', 'gone', f'--input={tmp_path / "digits.txt"}', '--tokenizer=char')
    os.remove(repo / 'data' / 'gone' / 'val.bin')
    p = run(repo, 'train.py', *TINY, '--dataset=gone', ok=False)
    assert_one_line_error(p, 'val.bin is missing', 'python prepare.py gone')


def test_nanogpt_checkpoint_and_meta_pkl(repo, tmp_path):
    """A checkpoint in nanoGPT's layout (its keys, '_orig_mod.' names of a compiled model, no
    scaler or random state, best_val_loss a tensor) and its char-level meta.pkl (no meta.json):
    sample.py samples from it and train.py resumes it. A meta.pkl that names a class is refused."""
    import pickle
    sys.path.insert(0, str(repo))
    from model import GPT, GPTConfig
    model_args = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, bias=True, vocab_size=65, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_args))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu')
    model(torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long))[1].backward()
    optimizer.step()
    config = dict(dataset='nano_char', batch_size=4, block_size=16, learning_rate=1e-3, max_iters=5000, compile=True)
    ckpt = dict(model={'_orig_mod.' + k: v for k, v in model.state_dict().items()}, optimizer=optimizer.state_dict(),
                model_args=model_args, iter_num=5, best_val_loss=torch.tensor(4.2), config=config)
    (repo / 'out-nano').mkdir()
    torch.save(ckpt, repo / 'out-nano' / 'ckpt.pt')
    src, data = repo / 'data' / 'shakespeare_char', repo / 'data' / 'nano_char'
    data.mkdir()
    for f in ('train.bin', 'val.bin'):
        shutil.copy(src / f, data / f)
    chars = json.loads((src / 'meta.json').read_text(encoding='utf-8'))['tokenizer']['chars']
    with open(data / 'meta.pkl', 'wb') as f:
        pickle.dump(dict(vocab_size=65, itos=dict(enumerate(chars)), stoi={c: i for i, c in enumerate(chars)}), f)

    p = run(repo, 'sample.py', '--out_dir=out-nano', '--start=ROMEO:', '--num_samples=1', '--max_new_tokens=10')
    assert p.stdout.startswith('ROMEO:') and len(p.stdout.split('---------------')[0]) == 6 + 10 + 1
    p = run(repo, 'train.py', *TINY, '--dataset=nano_char', '--init_from=resume', '--out_dir=out-nano',
            '--max_iters=7', '--eval_interval=7')
    assert sorted(logged(p.stdout, 'loss')) == [5, 6]

    marker = tmp_path / 'pwned'
    with open(data / 'meta.pkl', 'wb') as f:
        f.write(pickle.dumps(Payload(str(marker))))
    p = run(repo, 'sample.py', '--out_dir=out-nano', '--max_new_tokens=2', ok=False)
    assert_one_line_error(p, 'meta.pkl', 'only plain data')
    assert not marker.exists()
