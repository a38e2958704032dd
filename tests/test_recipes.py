"""
Every recipe in config/ builds a valid GPTConfig at its own size, and trains 2 iterations (or, for the
eval_only ones, evaluates) with its own settings, overridden only where this machine and the test's
time demand it, each override said below. The real train.py, as a subprocess, on tiny data.
"""

import json
import math
import os
import re
import shutil

import pytest
import torch

import configurator
from downloads import GPT2_SIZES
from model import GPT, GPTConfig
from test_configurator import settings_scope
from test_scripts import ROOT, repo, run  # noqa: F401 (repo is a fixture)

RECIPES = sorted(f for f in os.listdir(os.path.join(ROOT, 'config')) if f.endswith('.py'))
MODEL_KEYS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'dropout', 'flash', 'rope', 'rmsnorm', 'swiglu',
              'n_kv_head', 'qk_norm')
# eval_gpt2_{medium,large,xl}.py are eval_gpt2.py with another init_from (checked below): running one of the four
# covers the others, whose only difference the test would override anyway
RUN = [r for r in RECIPES if not re.match(r'eval_gpt2_', r)]


def recipe(name):
    """train.py's settings with the recipe applied, as train.py resolves its command line."""
    return configurator.configure(settings_scope('train.py'), [os.path.join(ROOT, 'config', name)])


@pytest.mark.parametrize('name', RECIPES)
def test_recipe_builds_a_gpt_config(name):
    c = recipe(name)
    assert c['dataset'] and c['out_dir'] == 'out-' + c['out_dir'][4:] and c['out_dir'] != 'out-'
    if c['init_from'] == 'scratch':  # the size it trains at; GPTConfig refuses what does not fit together
        vocab = 65 if c['dataset'] == 'shakespeare_char' else 50304
        GPTConfig(**{k: c[k] for k in MODEL_KEYS if k != 'flash'}, vocab_size=vocab)
    elif c['init_from'].endswith('.pt'):  # the quickstart's model, or a run the recipe says how to make
        base, text = os.path.dirname(c['init_from']), open(os.path.join(ROOT, 'config', name)).read()
        assert c['init_from'].endswith('/ckpt.pt')
        assert base == recipe('train_shakespeare_char_cpu.py')['out_dir'] or f'--out_dir={base}' in text
    else:  # GPT-2's weights, of one of the four sizes
        n_layer, n_head, n_embd = GPT2_SIZES[c['init_from']]
        GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50257)
    if name.startswith('eval_gpt2_'):
        others = {k: v for k, v in c.items() if k not in ('init_from', 'out_dir')}
        assert others == {k: v for k, v in recipe('eval_gpt2.py').items() if k not in ('init_from', 'out_dir')}


def tiny_hf_folder(folder):
    """A random GPT-2 of GPT-2's vocabulary in the Hugging Face layout (config.json, pytorch_model.bin),
    1 layer x 2 heads x 16, 16 positions: what init_from='gpt2' downloads, in small. train.py crops a longer
    block_size to the model's positions, so the recipes' 512 and 1024 train on rows of 16 (a quarter of the
    time that 64 positions took, most of it in the 50,257-wide lm_head)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257))
    # spelled out here, not hf_gpt2.HF_CONV1D: a wrong tuple there must not also build the folder it reads
    conv1d = ('c_attn.weight', 'c_proj.weight', 'c_fc.weight')  # stored (in, out) by transformers' Conv1D
    weights = {k: v.t().contiguous() if k.endswith(conv1d) else v
               for k, v in m.state_dict().items() if k != 'lm_head.weight'}
    os.makedirs(folder)
    torch.save(weights, os.path.join(folder, 'pytorch_model.bin'))
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(dict(model_type='gpt2', n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50257,
                       activation_function='gelu_new'), f)


@pytest.fixture(scope='module')
def gpt2_data(repo, tmp_path_factory):  # noqa: F811
    """tiny Shakespeare in GPT-2's BPE (301,966 train tokens), and the tiny Hugging Face folder."""
    run(repo, 'prepare.py', 'shakespeare')
    folder = str(tmp_path_factory.mktemp('hf') / 'gpt2')
    tiny_hf_folder(folder)
    # the chat recipes' data: the committed conversations, with the base's characters and with GPT-2's BPE
    shutil.copytree(os.path.join(ROOT, 'data', 'letters_chat'), repo / 'data' / 'letters_chat', dirs_exist_ok=True)
    run(repo, 'prepare.py', 'letters_chat')
    chats = str(repo / 'data' / 'letters_chat' / 'conversations.jsonl')
    run(repo, 'prepare.py', 'letters_chat_gpt2', f'--input={chats}', '--tokenizer=gpt2')
    shutil.copytree(os.path.join(ROOT, 'data', 'letters_prefs'), repo / 'data' / 'letters_prefs',
                    dirs_exist_ok=True)  # DPO's pairs
    run(repo, 'prepare.py', 'letters_prefs')
    return dict(gpt2=folder)


@pytest.fixture(scope='module')
def trained(repo, gpt2_data):  # noqa: F811
    """name -> (the recipe's settings, the test's overrides, train.py's CompletedProcess): each recipe run once,
    so that finetune_chat_cpu.py finetunes what train_shakespeare_char_cpu.py trained, as the recipes mean."""
    runs = {}

    def train(name):
        if name in runs:
            return runs[name]
        c = recipe(name)
        overrides = dict(
            device='cpu',  # the test machine's (a GPU recipe says 'auto')
            dtype='float32',  # 'auto' is bfloat16 on a CPU with native bf16: 2x slower at these sizes
            compile=False,  # torch.compile takes a minute on a CPU (train_gpt2.py sets True)
            max_iters=2,  # 2 iterations; evaluations at 0 and 2
            eval_iters=2,  # not hundreds of batches per evaluation
            plot=False,  # matplotlib costs a second a run; test_plot.py draws
        )
        if c['eval_hellaswag']:  # its file is downloaded (no network here); test_eval.py scores it during training
            overrides['eval_hellaswag'] = 0
        if c['init_from'].endswith('.pt'):  # the base recipe's run (tiny, 2 iterations): its last.pt, as ckpt.pt is
            # written only if 2 steps lowered the val loss; DPO's base is an SFT run (its recipe's is on
            # letters_styles: the same characters and template as letters_chat)
            sft = c['dataset'] == 'letters_prefs'
            base = train('finetune_chat_cpu.py' if sft else 'train_shakespeare_char_cpu.py')[0]
            overrides.update(init_from=str(repo / base['out_dir'] / 'last.pt'), block_size=16, batch_size=1)
        elif c['dataset'] not in ('shakespeare_char', 'shakespeare', 'letters_chat'):  # GPT-2 BPE, as theirs
            overrides['dataset'] = 'shakespeare'
        if c['init_from'] == 'scratch':  # GPU sizes made tiny: the same heads and key/value heads, 4 wide each
            overrides.update(n_embd=4 * c['n_head'], block_size=16, batch_size=1)
        elif 'init_from' not in overrides:  # GPT-2's weights without the download: its layout and vocabulary, 1 x 2 x 16
            overrides['init_from'] = gpt2_data['gpt2']
        if c['dataset'] in ('alpaca', 'alpaca_zh'):  # the hub's conversations: letters_chat's, in GPT-2's BPE
            overrides['dataset'] = 'letters_chat_gpt2'
        p = run(repo, 'train.py', f'config/{name}', *(f'--{k}={v}' for k, v in overrides.items()))
        runs[name] = c, overrides, p
        return runs[name]

    return train


@pytest.mark.parametrize('name', RUN)
def test_recipe_trains_two_iterations(repo, trained, name):  # noqa: F811
    c, overrides, p = trained(name)
    val = [float(v) for v in re.findall(r'val loss ([0-9.]+)', p.stdout)]
    assert val and all(math.isfinite(v) for v in val), p.stdout
    if c['eval_only']:
        assert len(val) == 1 and 'iter 0:' not in p.stdout and not os.path.exists(repo / c['out_dir'] / 'last.pt')
        return
    assert len(val) == 2 and 'iter 0:' in p.stdout
    ckpt = torch.load(repo / c['out_dir'] / 'last.pt', weights_only=True)
    assert ckpt['iter_num'] == 2
    # train.py stores what 'auto' or the model chose; finetune_shakespeare.py names its run by the clock
    resolved = ('device', 'dtype', 'compile', 'flash', 'block_size', 'wandb_run_name')
    saved = ckpt['config']
    mismatched = {k: (saved[k], v) for k, v in c.items() if k not in overrides and k not in resolved and saved[k] != v}
    assert not mismatched  # every other setting is the recipe's (or train.py's default that it keeps)
