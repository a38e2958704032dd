"""
GPT-2 in the Hugging Face layout, checked against transformers itself (an implementation written
independently of ours): checkpoint.from_pretrained on tiny random GPT2LMHeadModels saved to disk,
export_hf.py on checkpoints of the real train.py (run as subprocesses, as in test_scripts.py),
the tokenizer files derived from tiktoken's GPT-2 BPE, and the one-line answers when a library
or the hub is missing. Offline, CPU, float32; no test needs the network.
"""

import json
import os
import sys

import pytest
import torch

pytest.importorskip('transformers')  # a test requirement (requirements-test.txt), not a core one
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer  # noqa: E402

from checkpoint import load_checkpoint  # noqa: E402
from hf_models import from_pretrained  # noqa: E402
from tokenizer import gpt2_encoding  # noqa: E402
from test_scripts import ROOT, TINY, assert_one_line_error, repo, run  # noqa: E402,F401 (repo is a fixture)
from test_model import one_thread  # noqa: F401 (an autouse fixture: one torch thread)

TOL = 1e-5  # float32 logits of the two implementations agree to rounding
# text that exercises GPT-2's pre-tokenizer: contractions, runs of spaces, digits, newlines,
# accents, CJK, an emoji (4 UTF-8 bytes), tabs and carriage returns
TEXT = ("Hello world! I'm sure they'll say we've done it, don't you?\n\n   Three spaces, 12345678 digits;\t"
        "tab\r\nCRLF. Ça, c'est très bien — 中文字符, emoji 😀 and a trailing space ")


def lively_(params, seed=0, std=0.2):
    """Re-draw weights with a larger std: at GPT-2's init (std 0.02) the pre-activations are so
    small that the exact and tanh GELUs agree to 1e-7 and greedy output is one token repeated,
    so neither a wrong GELU nor a wrong context would show."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, std)


def tiny_hf(folder, activation='gelu_new', **save_args):
    """A random GPT2LMHeadModel with GPT-2's vocabulary, saved with save_pretrained to folder."""
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257,
                        activation_function=activation)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(config).eval()
    lively_(hf.parameters())
    hf.save_pretrained(folder, **save_args)
    return hf


def all_logits(model, idx):
    """Our logits at every position (with targets, forward projects every position, not the last)."""
    with torch.no_grad():
        return model(idx, idx)[0]


def greedy(hf, idx, n):
    """transformers' greedy continuation of idx by n tokens."""
    return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False,
                       pad_token_id=0)


def ids(B=2, T=40, vocab_size=50257, seed=1):
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# from_pretrained against transformers


@pytest.mark.parametrize('activation, flash', [('gelu_new', True), ('gelu_new', False), ('gelu', True)])
def test_from_pretrained_logits_equal_transformers(tmp_path, activation, flash):
    """GPT-2's tanh GELU ('gelu_new') and the exact one, through both attention paths."""
    hf = tiny_hf(tmp_path, activation)
    ours = from_pretrained(str(tmp_path), **dict(flash=flash)).eval()
    assert ours.config.gelu == {'gelu_new': 'tanh', 'gelu': 'exact'}[activation]
    idx = ids()
    with torch.no_grad():
        expected = hf(idx).logits
    assert expected.abs().max() > 1.0  # not near-uniform: the comparison means something
    torch.testing.assert_close(all_logits(ours, idx), expected, atol=TOL, rtol=0)


def test_greedy_generation_equals_transformers(tmp_path):
    hf = tiny_hf(tmp_path)
    ours = from_pretrained(str(tmp_path)).eval()
    idx = ids(T=8)
    expected = greedy(hf, idx, 24)
    assert len(set(expected[0, 8:].tolist())) > 3  # a varied continuation, not one token repeated
    assert ours.generate(idx, 24, temperature=0).tolist() == expected.tolist()
    assert ours.config.dropout == 0.0  # the default for inference; finetuning may ask for more
    assert from_pretrained(str(tmp_path), **dict(dropout=0.1)).config.dropout == 0.1


@pytest.mark.parametrize('layout', ['bin', 'shards'])
def test_from_pretrained_other_layouts(tmp_path, layout):
    """OpenAI's original files on the hub (pytorch_model.bin of a GPT2Model: names without
    'transformer.', the attention-mask buffers, an lm_head equal to wte), and a model saved in shards."""
    if layout == 'shards':
        hf = tiny_hf(tmp_path, max_shard_size='1MB')
        assert len([f for f in os.listdir(tmp_path) if f.endswith('.safetensors')]) > 1
    else:
        hf = tiny_hf(tmp_path)
        os.remove(tmp_path / 'model.safetensors')
        state_dict = dict(hf.transformer.state_dict(), **{'lm_head.weight': hf.lm_head.weight.detach()})
        for i in range(hf.config.n_layer):
            state_dict[f'h.{i}.attn.bias'] = torch.ones(1, 1, 64, 64).tril()
            state_dict[f'h.{i}.attn.masked_bias'] = torch.tensor(-1e4)
        torch.save(state_dict, tmp_path / 'pytorch_model.bin')
    ours = from_pretrained(str(tmp_path)).eval()
    idx = ids()
    with torch.no_grad():
        torch.testing.assert_close(all_logits(ours, idx), hf(idx).logits, atol=TOL, rtol=0)


def test_from_pretrained_refuses_what_it_cannot_load(tmp_path):
    """Each with a one-line message naming the problem."""
    tiny_hf(tmp_path)
    cases = []
    with pytest.raises(ValueError, match='dropout and flash') as e:
        from_pretrained(str(tmp_path), **dict(n_layer=1))
    cases.append(e)
    config = json.loads((tmp_path / 'config.json').read_text())
    (tmp_path / 'config.json').write_text(json.dumps(dict(config, activation_function='relu')))
    with pytest.raises(ValueError, match="activation_function='relu'") as e:
        from_pretrained(str(tmp_path))
    cases.append(e)
    (tmp_path / 'config.json').write_text(json.dumps(dict(config, n_layer=3)))  # weights of 2 layers
    with pytest.raises(ValueError, match=r'do not fit its config\.json .*h\.2\.') as e:
        from_pretrained(str(tmp_path))
    cases.append(e)
    (tmp_path / 'config.json').write_text(json.dumps(config))
    (tmp_path / 'model.safetensors').write_bytes(b'not a safetensors file')
    with pytest.raises(ValueError, match='cannot read .*model.safetensors') as e:
        from_pretrained(str(tmp_path))
    cases.append(e)
    os.remove(tmp_path / 'model.safetensors')
    with pytest.raises(ValueError, match='no model.safetensors nor pytorch_model.bin') as e:
        from_pretrained(str(tmp_path))
    cases.append(e)
    with pytest.raises(ValueError, match="'gpt3' is not a folder, nor one of gpt2, gpt2-medium") as e:
        from_pretrained('gpt3')
    cases.append(e)
    assert all('\n' not in str(e.value) for e in cases)


def test_untied_lm_head_is_refused(tmp_path):
    hf = tiny_hf(tmp_path)
    state_dict = dict(hf.state_dict(), **{'lm_head.weight': torch.randn(50257, 32)})
    os.remove(tmp_path / 'model.safetensors')
    torch.save(state_dict, tmp_path / 'pytorch_model.bin')
    with pytest.raises(ValueError, match='lm_head differs from wte'):
        from_pretrained(str(tmp_path))


def test_missing_safetensors_names_the_pip_install(tmp_path, monkeypatch):
    tiny_hf(tmp_path)
    monkeypatch.setitem(sys.modules, 'safetensors', None)  # import safetensors now raises ImportError
    monkeypatch.setitem(sys.modules, 'safetensors.torch', None)
    with pytest.raises(ImportError, match='pip install safetensors') as e:
        from_pretrained(str(tmp_path))
    assert '\n' not in str(e.value)


# -----------------------------------------------------------------------------
# sample.py with pretrained weights: a folder, the hub out of reach, a library missing


def fake_package(folder, name, files):
    """A package that shadows an installed one when folder is put on PYTHONPATH."""
    for file, code in files.items():
        path = folder / name / file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)
    return str(folder)


def test_sample_from_a_folder_equals_transformers(repo, tmp_path):
    """sample.py --init_from=FOLDER, greedy: the text transformers' greedy generation decodes to."""
    hf = tiny_hf(tmp_path / 'tiny')
    enc = gpt2_encoding()
    prompt = torch.tensor([enc.encode_ordinary('Hello world')])
    expected = enc.decode(greedy(hf, prompt, 12)[0].tolist())
    p = run(repo, 'sample.py', f'--init_from={tmp_path / "tiny"}', '--start=Hello world', '--temperature=0',
            '--num_samples=1', '--max_new_tokens=12', '--stop_at_eot=False', '--device=cpu', '--dtype=float32')
    assert p.stdout == expected + '\n---------------\n'


@pytest.mark.parametrize('env', [dict(HF_ENDPOINT='http://127.0.0.1:9'), dict(HF_HUB_OFFLINE='1')])
def test_hub_unreachable_gets_one_line(repo, tmp_path, monkeypatch, env):
    """A closed port as the hub (HF_ENDPOINT), or offline mode: one line that says so and names
    the local-folder route. An empty HF_HOME, so that no cached copy of gpt2 answers instead."""
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf-home'))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    p = run(repo, 'sample.py', '--init_from=gpt2', '--device=cpu', ok=False)
    assert_one_line_error(p, "cannot download 'gpt2' from the Hugging Face hub", '--local-dir', 'pass its path')


def test_missing_hub_client_gets_one_line(repo, tmp_path, monkeypatch):
    hidden = fake_package(tmp_path, 'huggingface_hub', {'__init__.py': 'raise ImportError("hidden by the test")'})
    monkeypatch.setenv('PYTHONPATH', hidden)
    p = run(repo, 'sample.py', '--init_from=gpt2', '--device=cpu', ok=False)
    assert_one_line_error(p, 'pip install transformers')


# -----------------------------------------------------------------------------
# export_hf.py: checkpoints of train.py, loaded back by transformers


def liven_checkpoint(path, std=0.5):
    """Give a checkpoint lively weights (see lively_), so that comparisons of logits are sharp."""
    model, checkpoint = load_checkpoint(path, 'cpu', mmap=False)  # read whole: the file is written over below
    lively_(model.parameters(), seed=3, std=std)
    checkpoint['model'] = model.state_dict()
    torch.save(checkpoint, path)
    return model.eval()


@pytest.fixture(scope='module')
def gpt2_export(repo, tmp_path_factory):
    """A tiny model trained on GPT-2 BPE data (vocab 50,257, padded to 50,304 by train.py), exported."""
    text = tmp_path_factory.mktemp('text') / 'small.txt'
    with open(os.path.join(ROOT, 'data', 'shakespeare_char', 'input.txt'), encoding='utf-8') as f:
        text.write_text(f.read()[:50_000], encoding='utf-8')
    run(repo, 'prepare.py', 'small_gpt2', f'--input={text}', '--tokenizer=gpt2')
    run(repo, 'train.py', *TINY, '--dataset=small_gpt2', '--max_iters=1', '--eval_interval=1', '--out_dir=out-bpe')
    ours = liven_checkpoint(repo / 'out-bpe' / 'ckpt.pt')
    p = run(repo, 'export_hf.py', '--out_dir=out-bpe', '--hf_dir=out-bpe-hf')
    return ours, repo / 'out-bpe-hf', p.stdout


def test_export_loads_in_transformers_with_equal_logits(gpt2_export):
    ours, folder, stdout = gpt2_export
    assert ours.config.vocab_size == 50304  # train.py's padding ...
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    assert hf.config.vocab_size == 50257  # ... cut back to GPT-2's vocabulary
    assert (hf.config.n_layer, hf.config.n_head, hf.config.n_embd, hf.config.n_positions) == (1, 2, 16, 16)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as written
    idx = ids(T=16)
    with torch.no_grad():
        expected = hf(idx).logits
    torch.testing.assert_close(all_logits(ours, idx)[..., :50257], expected, atol=TOL, rtol=0)
    prompt = idx[:, :4]
    assert ours.generate(prompt, 12, temperature=0, vocab_size=50257).tolist() == greedy(hf, prompt, 12).tolist()
    # and back: our own reader gives the same logits
    torch.testing.assert_close(all_logits(from_pretrained(str(folder)).eval(), idx), expected, atol=TOL, rtol=0)
    assert "GPT-2's tokenizer" in stdout


def test_export_tokenizer_files_encode_as_tiktoken(gpt2_export):
    """vocab.json + merges.txt (transformers' GPT2Tokenizer) and tokenizer.json (the tokenizers
    library) give tiktoken's ids on mixed text and on 100,000 characters of Shakespeare."""
    tokenizers = pytest.importorskip('tokenizers')
    folder = gpt2_export[1]
    enc = gpt2_encoding()
    with open(os.path.join(ROOT, 'data', 'shakespeare_char', 'input.txt'), encoding='utf-8') as f:
        texts = [TEXT, f.read()[:100_000]]
    vocab = json.loads((folder / 'vocab.json').read_text(encoding='utf-8'))
    merges = (folder / 'merges.txt').read_text(encoding='utf-8').splitlines()
    assert len(vocab) == 50257 and vocab['<|endoftext|>'] == 50256 and vocab['Hello'] == 15496
    assert merges[0] == '#version: 0.2' and len(merges) == 1 + 50000 and merges[1] == 'Ġ t'  # GPT-2's first merge
    from_files = GPT2Tokenizer(vocab=str(folder / 'vocab.json'), merges=str(folder / 'merges.txt'))
    from_folder = GPT2Tokenizer.from_pretrained(folder)
    from_json = tokenizers.Tokenizer.from_file(str(folder / 'tokenizer.json'))
    for text in texts:
        expected = enc.encode_ordinary(text)
        assert from_files.encode(text) == expected
        assert from_folder.encode(text) == expected
        assert from_json.encode(text).ids == expected
        assert from_folder.decode(expected) == text
    assert from_json.encode('a<|endoftext|>b').ids == enc.encode('a<|endoftext|>b', allowed_special='all')


@pytest.fixture(scope='module')
def char_ckpt(repo):
    """A tiny character-level model of Shakespeare in out-char, with lively weights."""
    run(repo, 'train.py', *TINY, '--max_iters=1', '--eval_interval=1', '--out_dir=out-char')
    return liven_checkpoint(repo / 'out-char' / 'ckpt.pt')


def test_export_char_model(repo, char_ckpt):
    """A character vocabulary goes as a tokenizer.json (tests/test_export.py checks what it encodes);
    the logits are equal."""
    p = run(repo, 'export_hf.py', '--out_dir=out-char', '--hf_dir=out-char-hf')
    assert 'its 65 characters as a tokenizer.json' in p.stdout
    assert sorted(os.listdir(repo / 'out-char-hf')) == ['config.json', 'model.safetensors',
                                                        'tokenizer.json', 'tokenizer_config.json']
    hf = GPT2LMHeadModel.from_pretrained(repo / 'out-char-hf').eval()
    assert hf.config.vocab_size == 65 and hf.config.eos_token_id is None
    idx = ids(T=16, vocab_size=65)
    with torch.no_grad():
        torch.testing.assert_close(all_logits(char_ckpt, idx), hf(idx).logits, atol=TOL, rtol=0)


def test_export_copies_a_tokenizers_file(repo, tmp_path):
    """Data with its own BPE (prepare.py --tokenizer=bpe): tokenizer.json is copied, and
    transformers' AutoTokenizer encodes as the tokenizers library does."""
    tokenizers = pytest.importorskip('tokenizers')
    from transformers import AutoTokenizer
    (tmp_path / 't.txt').write_text(TEXT * 200, encoding='utf-8')
    run(repo, 'prepare.py', 'small_bpe', f'--input={tmp_path / "t.txt"}', '--tokenizer=bpe', '--vocab_size=300')
    run(repo, 'train.py', *TINY, '--dataset=small_bpe', '--max_iters=1', '--eval_interval=1', '--out_dir=out-tok')
    run(repo, 'export_hf.py', '--out_dir=out-tok', '--hf_dir=out-tok-hf')
    tok = tokenizers.Tokenizer.from_file(str(repo / 'data' / 'small_bpe' / 'tokenizer.json'))
    assert AutoTokenizer.from_pretrained(repo / 'out-tok-hf').encode(TEXT) == tok.encode(TEXT).ids
    config = json.loads((repo / 'out-tok-hf' / 'config.json').read_text())
    assert config['vocab_size'] == tok.get_vocab_size() and config['eos_token_id'] == tok.token_to_id('<|endoftext|>')


def export(repo, *args, out_dir='out-char'):
    return run(repo, 'export_hf.py', f'--out_dir={out_dir}', *args, ok=False)


def test_export_bad_paths_get_one_line(repo, char_ckpt):
    assert_one_line_error(export(repo, out_dir='out-none'), 'no checkpoint', 'out-none')
    assert_one_line_error(export(repo, '--hf_dir=out-char/ckpt.pt/hf'), 'cannot write', 'Not a directory')


def test_export_replaces_only_an_earlier_export(repo, char_ckpt):
    """An existing folder is replaced only when asked to, and only when it holds an earlier export."""
    os.makedirs(repo / 'out-again')  # an empty folder is fine
    assert export(repo, '--hf_dir=out-again').returncode == 0
    (repo / 'out-again' / 'stale.txt').write_text('from before')
    assert_one_line_error(export(repo, '--hf_dir=out-again'), 'already exists', '--overwrite=True')
    assert export(repo, '--hf_dir=out-again', '--overwrite=True').returncode == 0
    assert sorted(os.listdir(repo / 'out-again')) == ['config.json', 'model.safetensors',
                                                      'tokenizer.json', 'tokenizer_config.json']
    os.makedirs(repo / 'out-mine')
    (repo / 'out-mine' / 'notes.txt').write_text('mine')
    assert_one_line_error(export(repo, '--hf_dir=out-mine', '--overwrite=True'), 'already exists')
    assert os.listdir(repo / 'out-mine') == ['notes.txt']


def test_export_failure_while_writing_leaves_nothing(repo, char_ckpt, tmp_path, monkeypatch):
    """A full disk (simulated) and a missing library: one line each, and neither hf_dir nor a
    temporary folder is left behind."""
    full = fake_package(tmp_path / 'full', 'safetensors', {
        '__init__.py': '', 'torch.py': 'def save_file(*a, **k):\n    raise OSError(28, "No space left on device")\n'})
    monkeypatch.setenv('PYTHONPATH', full)
    assert_one_line_error(export(repo, '--hf_dir=out-full'), 'cannot write out-full', 'No space left')
    missing = fake_package(tmp_path / 'missing', 'safetensors', {'__init__.py': 'raise ImportError("hidden")'})
    monkeypatch.setenv('PYTHONPATH', missing)
    assert_one_line_error(export(repo, '--hf_dir=out-full'), 'pip install safetensors')
    assert not [f for f in os.listdir(repo) if f.startswith('out-full')]


def test_export_bias_false_model(repo):
    """GPT-2's layout has a bias in every Linear and LayerNorm: a bias=False model's are written as zeros,
    and transformers' logits are ours."""
    run(repo, 'train.py', *TINY, '--max_iters=1', '--eval_interval=1', '--bias=False', '--out_dir=out-nobias')
    ours = liven_checkpoint(repo / 'out-nobias' / 'ckpt.pt')
    assert not ours.config.bias
    run(repo, 'export_hf.py', '--out_dir=out-nobias', '--hf_dir=out-nobias-hf')
    hf = GPT2LMHeadModel.from_pretrained(repo / 'out-nobias-hf').eval()
    assert hf.transformer.h[0].mlp.c_fc.bias.abs().sum() == 0 and hf.transformer.ln_f.bias.shape == (16,)
    idx = ids(T=16, vocab_size=65)
    with torch.no_grad():
        torch.testing.assert_close(all_logits(ours, idx), hf(idx).logits, atol=TOL, rtol=0)


def test_export_refuses_architecture_switches(repo):
    """Rotary embeddings, RMSNorm, SwiGLU, GQA and QK-norm have no place in GPT-2's layout."""
    run(repo, 'train.py', *TINY, '--max_iters=1', '--eval_interval=1', '--rope=True', '--n_kv_head=1',
        '--out_dir=out-modern')
    assert_one_line_error(export(repo, '--hf_dir=out-modern-hf', out_dir='out-modern'), 'rope, n_kv_head')
    assert not os.path.exists(repo / 'out-modern-hf')


def test_finetune_from_a_folder_resume_and_export(repo, tmp_path):
    """train.py --init_from=FOLDER: GPT-2's shape (vocab 50257, tanh GELU) goes into the checkpoint,
    whatever the settings say; training lowers the loss, resume takes the shape from it, and the
    finetuned model exports back to the Hugging Face format."""
    tiny_hf(tmp_path / 'hf')
    run(repo, 'prepare.py', 'shakespeare')
    args = ['--dataset=shakespeare', '--batch_size=4', '--block_size=32', '--gradient_accumulation_steps=1',
            '--eval_iters=2', '--device=cpu', '--dtype=float32', '--learning_rate=1e-3', '--warmup_iters=0',
            '--eval_interval=2', '--plot=False', '--out_dir=out-ft']  # loss.png: test_eval.py draws it
    run(repo, 'train.py', *args, f'--init_from={tmp_path / "hf"}', '--max_iters=2')
    ckpt = torch.load(repo / 'out-ft' / 'last.pt', weights_only=True)
    assert ckpt['model_args']['vocab_size'] == 50257 and ckpt['arch']['gelu'] == 'tanh'  # (arch: checkpoint.py)
    assert ckpt['model_args']['block_size'] == 32  # cropped from 64 to the setting
    p = run(repo, 'train.py', *args, '--init_from=resume', '--max_iters=4')
    assert 'iter 3:' in p.stdout
    run(repo, 'export_hf.py', '--out_dir=out-ft', f'--hf_dir={tmp_path / "back"}')
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / 'back').eval()
    ours, _ = load_checkpoint(str(repo / 'out-ft' / 'ckpt.pt'), 'cpu')
    idx = ids(B=1, T=20)
    torch.testing.assert_close(all_logits(ours.eval(), idx), hf(idx).logits, rtol=0, atol=TOL)
