"""
export_hf.py on checkpoints of the real train.py, for every layout the switches compute (GPT-2,
Llama with and without grouped-query attention and biases, Qwen3) and every kind of tokenizer the
data can have (GPT-2's BPE, a BPE prepare.py trained, a tokenizer.json, characters), read back by
independent implementations: transformers (logits, AutoTokenizer, apply_chat_template) and, for
the byte-level BPEs, llama.cpp itself through the GGUF file (logits, tokens, greedy generation).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip('transformers')
tk = pytest.importorskip('tokenizers')
llama_cpp = pytest.importorskip('llama_cpp')

from conversations import encode_conversation, render_prompt  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402
from test_gguf import QWEN2_PATTERN, load  # noqa: E402
from test_hf import liven_checkpoint  # noqa: E402
from test_resume import TORCHRUN  # noqa: E402
from test_scripts import ROOT, TINY, assert_one_line_error, repo, run  # noqa: E402,F401 (a fixture)

# mixed text: ASCII, runs of spaces, newlines, a tab, digits, Chinese, an emoji (4 UTF-8 bytes)
MIXED = "Hello  world!\n\n你好，世界 🙂 123 4567 it's   ROMEO:\n  a, b.\tc"
LAYOUTS = {  # train.py's switches -> the architecture export_hf.py writes
    'gpt2': ([], 'GPT2LMHeadModel'),
    'llama': (['--rope=True', '--rmsnorm=True', '--swiglu=True', '--bias=False'], 'LlamaForCausalLM'),
    'llama_gqa_bias': (['--rope=True', '--rmsnorm=True', '--swiglu=True', '--bias=True', '--n_head=4',
                        '--n_kv_head=2'], 'LlamaForCausalLM'),
    'qwen3': (['--rope=True', '--rmsnorm=True', '--swiglu=True', '--qk_norm=True', '--bias=False',
               '--n_head=4', '--n_kv_head=1'], 'Qwen3ForCausalLM'),
}
KINDS = ('gpt2', 'bpe', 'json', 'char')  # the tokenizers a dataset can have (tokenizer.py)
WORDS = 'abc hello world romeo juliet tybalt nurse friar mercutio benvolio capulet montague'.split()
CHATS = [{'messages': [{'role': 'user', 'content': w}, {'role': 'assistant', 'content': w.upper()}]}
         for w in WORDS * 5]


@pytest.fixture(scope='module')
def datasets(repo, tmp_path_factory):  # noqa: F811
    """data/mix_<kind> for each kind, prepared from Shakespeare and MIXED by prepare.py, and
    data/chat_<kind>: conversations with the chat template over each tokenizer."""
    tmp = tmp_path_factory.mktemp('text')
    with open(os.path.join(ROOT, 'data', 'shakespeare_char', 'input.txt'), encoding='utf-8') as f:
        (tmp / 'mix.txt').write_text(f.read(60_000) + MIXED * 30, encoding='utf-8')
    # a tokenizer.json of Qwen2's kind: its split regex, then bytes (llama.cpp's 'qwen2')
    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(QWEN2_PATTERN), 'isolated'),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = tk.decoders.ByteLevel()
    bpe.train_from_iterator([(tmp / 'mix.txt').read_text(encoding='utf-8')], tk.trainers.BpeTrainer(
        vocab_size=400, special_tokens=['<|endoftext|>'], initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(tmp / 'qwen_like.json'))
    tokenizer = dict(gpt2='gpt2', bpe='bpe', json=str(tmp / 'qwen_like.json'), char='char')
    (tmp / 'chats.jsonl').write_text(''.join(json.dumps(c) + '\n' for c in CHATS))
    for kind in KINDS:
        run(repo, 'prepare.py', f'mix_{kind}', f'--input={tmp / "mix.txt"}', f'--tokenizer={tokenizer[kind]}',
            '--vocab_size=400')
        run(repo, 'prepare.py', f'chat_{kind}', f'--input={tmp / "chats.jsonl"}', f'--tokenizer=data/mix_{kind}')
    return repo


@pytest.fixture(scope='module')
def exported(datasets, tmp_path_factory):
    """(layout, dataset) -> (our model with lively weights, the exported folder, its GGUF: None for
    characters), trained for one step by train.py and exported by export_hf.py on first use."""
    cache = {}

    def get(layout, dataset):
        gguf = not dataset.endswith('char')
        if (layout, dataset) not in cache:
            out = f'out-x-{layout}-{dataset}'
            run(datasets, 'train.py', *TINY, *LAYOUTS[layout][0], f'--dataset={dataset}', '--max_iters=1',
                '--eval_interval=1', f'--out_dir={out}')
            ours = liven_checkpoint(datasets / out / 'ckpt.pt', std=0.3)
            folder = tmp_path_factory.mktemp(f'{layout}-{dataset}') / 'hf'
            path = str(folder) + '.gguf' if gguf else ''
            p = run(datasets, 'export_hf.py', f'--out_dir={out}', f'--hf_dir={folder}', f'--gguf={path}')
            assert f'a {LAYOUTS[layout][1]} of' in p.stdout, p.stdout
            cache[layout, dataset] = ours, folder, path or None
        return cache[layout, dataset]
    return get


def our_tokenizer(repo, dataset):
    from tokenizer import load_tokenizer, load_meta
    return load_tokenizer(load_meta(str(repo / 'data' / dataset)), str(repo / 'data' / dataset))


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_each_layout_loads_in_transformers_with_our_logits(exported, layout):
    ours, folder, _ = exported(layout, 'mix_bpe')
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == LAYOUTS[layout][1]
    idx = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(idx, idx)[0][..., :hf.config.vocab_size]
        torch.testing.assert_close(hf(idx).logits, want, atol=1e-4, rtol=0)
    assert want.std() > 0.2  # logits that depend on the weights: a wrong mapping shows


@pytest.mark.parametrize('kind', KINDS)
def test_each_tokenizer_encodes_as_ours_in_transformers(datasets, exported, kind):
    """AutoTokenizer on the exported folder: our ids on mixed English, Chinese and emoji text, and
    the text back; a chat model's apply_chat_template gives the ids chat.py feeds."""
    _, folder, _ = exported('gpt2', f'mix_{kind}')
    tok = our_tokenizer(datasets, f'mix_{kind}')
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok.encode(MIXED)
    assert hf_tok.encode(MIXED, add_special_tokens=False) == ids and len(set(ids)) > 10
    assert hf_tok.decode(ids) == MIXED
    _, chat_folder, _ = exported('gpt2', f'chat_{kind}')
    chat_tok = our_tokenizer(datasets, f'chat_{kind}')
    hf_chat = transformers.AutoTokenizer.from_pretrained(chat_folder)
    history = [dict(role='user', content='hello'), dict(role='assistant', content='HELLO'),
               dict(role='user', content='你好 🙂')]
    if kind == 'char':  # a character model knows its own characters only
        history[-1]['content'] = 'romeo'
    prompt = hf_chat.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(prompt) == render_prompt(chat_tok, history)


# each layout with our trained BPE, each byte-level tokenizer with GPT-2's layout and Qwen3's (every
# switch on): a GPT-2-BPE model with every switch on goes both routes
GGUF_CASES = [(layout, 'bpe') for layout in sorted(LAYOUTS)] + \
    [(layout, kind) for layout in ('gpt2', 'qwen3') for kind in ('gpt2', 'json')]


@pytest.mark.parametrize('layout, kind', GGUF_CASES)
def test_gguf_in_llama_cpp(datasets, exported, layout, kind):
    """llama.cpp on the GGUF file: our logits for the same ids (float32), our ids for mixed text,
    and sample.py --temperature=0's greedy tokens."""
    ours, folder, path = exported(layout, f'mix_{kind}')
    tok = our_tokenizer(datasets, f'mix_{kind}')
    llm = load(path)
    ids = tok.encode(MIXED)
    assert llm.tokenize(MIXED.encode(), add_bos=False, special=False) == ids
    with torch.no_grad():
        want = ours(torch.tensor([ids[:16]]), torch.tensor([ids[:16]]))[0][0, :, :llm.n_vocab()].numpy()
    llm.eval(ids[:16])
    err = abs(llm.scores[:16] - want).max()
    # (GPT-2's layout: 4-7e-4 here, where llama.cpp's GELU is a float16 table of the tanh form
    # (test_gguf.py); Llama's and Qwen3's: 4-7e-7)
    assert err < 1e-3, err
    prompt = tok.encode('ROMEO:')
    p = run(datasets, 'sample.py', f'--out_dir=out-x-{layout}-mix_{kind}', '--start=ROMEO:', '--temperature=0',
            '--max_new_tokens=8', '--num_samples=1', '--device=cpu', '--dtype=float32', '--stop_at_eot=False')
    llm.reset()
    greedy = []
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
        greedy.append(token)
        if len(greedy) == 8:
            break
    text = tok.decode(prompt + greedy).replace('\r\n', '\n').replace('\r', '\n')  # as a pipe reads it
    assert p.stdout.split('\n---------------')[0] == text


def test_character_model_gguf_is_refused_in_one_line(datasets):
    run(datasets, 'train.py', *TINY, '--dataset=mix_char', '--max_iters=1', '--eval_interval=1',
        '--out_dir=out-x-char-refused')
    p = run(datasets, 'export_hf.py', '--out_dir=out-x-char-refused', '--hf_dir=out-x-char-hf',
            '--gguf=out-x-char.gguf', ok=False)
    assert_one_line_error(p, 'character', 'llama.cpp', 'transformers')
    assert not os.path.exists(datasets / 'out-x-char-hf') and not os.path.exists(datasets / 'out-x-char.gguf')


def test_modern_recipe_model_through_transformers(datasets):
    """config/train_shakespeare_char_modern.py (rope, RMSNorm, SwiGLU, GQA, QK-norm: Qwen3's layout),
    a few steps, exported with its characters: transformers' pipeline continues a prompt as
    sample.py does, greedy."""
    run(datasets, 'train.py', 'config/train_shakespeare_char_modern.py', '--max_iters=3', '--eval_interval=3',
        '--eval_iters=1', '--plot=False', '--out_dir=out-x-modern', '--dtype=float32', '--eval_sample=')
    run(datasets, 'export_hf.py', '--out_dir=out-x-modern', '--hf_dir=out-x-modern-hf')
    generate = transformers.pipeline('text-generation', str(datasets / 'out-x-modern-hf'))
    theirs = generate('ROMEO:', max_new_tokens=10, do_sample=False)[0]['generated_text']
    p = run(datasets, 'sample.py', '--out_dir=out-x-modern', '--start=ROMEO:', '--temperature=0',
            '--max_new_tokens=10', '--num_samples=1', '--device=cpu', '--dtype=float32')
    assert p.stdout.split('\n---------------')[0] == theirs


def test_export_of_a_checkpoint_written_under_fsdp(datasets):
    """torchrun with 2 FSDP processes writes a plain checkpoint: it exports like any other."""
    p = subprocess.run([*TORCHRUN, 'train.py', *TINY, *LAYOUTS['qwen3'][0], '--dataset=mix_bpe', '--fsdp=True',
                        '--gradient_accumulation_steps=2', '--max_iters=2', '--eval_interval=2',
                        '--out_dir=out-x-fsdp'], cwd=datasets, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    run(datasets, 'export_hf.py', '--out_dir=out-x-fsdp', '--hf_dir=out-x-fsdp-hf')
    model, _ = load_checkpoint(str(datasets / 'out-x-fsdp' / 'ckpt.pt'), 'cpu')
    hf = transformers.AutoModelForCausalLM.from_pretrained(datasets / 'out-x-fsdp-hf').eval()
    idx = torch.randint(0, 400, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx, idx)[0][..., :hf.config.vocab_size],
                                   atol=1e-4, rtol=0)
