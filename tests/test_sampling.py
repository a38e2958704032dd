"""
Sampling: generate() draws from softmax(logits / temperature) restricted to the top_k likeliest
tokens (seeded frequency tests against the distribution computed here), and sample.py's options
(--ckpt_name, the fallback to last.pt, --kv_cache=False, --block_size, a FILE: prompt) against
greedy generation from the checkpoint it should have read. CPU, float32, seeded.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_checkpoint
from model import GPT, GPTConfig
from test_scripts import TINY, repo, run  # noqa: F401 (repo is a fixture)

N = 20000  # draws per frequency test
# The total variation distance between N draws' frequencies and their distribution over V = 20 tokens
# is about sum_i sqrt(p_i (1 - p_i) / N) * sqrt(2 / pi) / 2 <= sqrt(V / N) * 0.4 = 0.013 on average;
# 0.03 leaves room for the seed, and a wrong distribution here is 0.15 or more away (asserted below).
TV_TOL = 0.03


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


@pytest.fixture(scope='module')
def lively():
    """A random GPT over 20 tokens whose next-token logits for one prompt spread over several nats,
    and those logits (1, 20), computed by a plain forward pass."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20, dropout=0.0))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    m.eval()
    idx = torch.tensor([[3, 1, 4]])
    with torch.no_grad():
        logits = m(idx)[0][:, -1, :]  # (1, 20)
    assert logits.max() - logits.min() > 3  # far from uniform: the temperature matters
    return m, idx, logits[0]


def draw(m, idx, seed=1, **kwargs):
    """The frequencies (20,) of generate()'s next token over N copies of idx, in one batch."""
    torch.manual_seed(seed)
    with torch.no_grad():
        y = m.generate(idx.repeat(N, 1), 1, **kwargs)  # (N, T + 1)
    return torch.bincount(y[:, -1], minlength=20).double() / N


@pytest.mark.parametrize('temperature', [0.5, 2.0])
def test_temperature_samples_softmax_of_logits_over_t(lively, temperature):
    m, idx, logits = lively
    want = F.softmax(logits.double() / temperature, dim=-1)
    assert total_variation(want, F.softmax(logits.double(), dim=-1)) > 0.15  # T = 1 would be told apart
    assert total_variation(draw(m, idx, temperature=temperature), want) < TV_TOL


def test_top_k_draws_only_the_k_likeliest(lively):
    """top_k = 3 of 20 at temperature 2 (which flattens the rest, so a token outside would be drawn
    thousands of times): only the 3 likeliest appear, each as often as softmax over those 3 says."""
    m, idx, logits = lively
    top = torch.topk(logits, 3).indices
    freq = draw(m, idx, temperature=2.0, top_k=3)
    outside = torch.ones(20, dtype=torch.bool)
    outside[top] = False
    assert freq[outside].sum() == 0 and (freq[top] > 0).all()
    want = torch.zeros(20, dtype=torch.float64)
    want[top] = F.softmax(logits[top].double() / 2.0, dim=-1)
    assert total_variation(freq, want) < TV_TOL
    assert F.softmax(logits.double() / 2.0, dim=-1)[outside].sum() > 0.3  # without the mask they would show


# -----------------------------------------------------------------------------
# sample.py's options, against greedy generation from the file it should read

def greedy_text(path, prompt, chars, block_size=None, n=20):
    m, _ = load_checkpoint(path, 'cpu')
    m.eval()
    if block_size:
        m.crop_block_size(block_size)
    idx = torch.tensor([[chars.index(c) for c in prompt]])
    with torch.no_grad():
        out = m.generate(idx, n, temperature=0, use_cache=False)
    return ''.join(chars[i] for i in out[0].tolist())


def test_sample_options(repo, tmp_path):  # noqa: F811
    """ckpt.pt by default; --ckpt_name=last.pt reads last.pt; a folder with last.pt only falls back to it;
    --kv_cache=False gives the tokens the cache gives; --block_size=8 crops the model, so that it sees
    only the prompt's last 8 characters; --start=FILE:path reads the prompt from the file."""
    run(repo, 'train.py', *TINY, '--max_iters=2', '--eval_interval=2', '--out_dir=out-opts')
    out = repo / 'out-opts'
    # last.pt: the same model with other weights, so that the text shows which file was read; positions
    # (wpe) that differ more than the rest make its greedy text depend on where each token sits
    ckpt = torch.load(out / 'last.pt', weights_only=True)
    torch.manual_seed(0)
    ckpt['model'] = {k: torch.randn_like(v) * (1.0 if 'wpe' in k else 0.1) for k, v in ckpt['model'].items()}
    torch.save(ckpt, out / 'last.pt')
    (repo / 'out-lastonly').mkdir()
    torch.save(ckpt, repo / 'out-lastonly' / 'last.pt')
    (repo / 'romeo.txt').write_text('ROMEO:', encoding='utf-8')
    chars = json.loads((repo / 'data' / 'shakespeare_char' / 'meta.json').read_text())['tokenizer']['chars']
    sample = lambda *a: run(repo, 'sample.py', '--num_samples=1', '--max_new_tokens=20', '--temperature=0',
                            '--dtype=float32', '--device=cpu', *a).stdout
    end = '\n---------------\n'

    best, last = (greedy_text(out / name, 'ROMEO:', chars) for name in ('ckpt.pt', 'last.pt'))
    assert best != last
    cached = sample('--out_dir=out-opts', '--start=ROMEO:')
    assert cached == best + end
    assert sample('--out_dir=out-opts', '--start=ROMEO:', '--kv_cache=False') == cached
    assert sample('--out_dir=out-opts', '--ckpt_name=last.pt', '--start=FILE:romeo.txt') == last + end

    prompt = "ROMEO:\nWhat say'st thou?"  # 24 characters: more than 8
    cropped = greedy_text(repo / 'out-lastonly' / 'last.pt', prompt, chars, block_size=8)
    assert cropped != greedy_text(repo / 'out-lastonly' / 'last.pt', prompt, chars)  # the crop shows
    p = sample('--out_dir=out-lastonly', f'--start={prompt}', '--block_size=8')
    assert p.endswith(cropped + end)
    assert '(no ckpt.pt yet: using out-lastonly/last.pt)' in p and 'the model sees only the last 8' in p
