"""
Tests of model.py's architecture switches (rope, rmsnorm, swiglu, n_kv_head, qk_norm), by numbers:
rotary embeddings see relative positions only; grouped-query attention equals plain attention
with its key/value heads repeated; every combination of switches, on both attention paths,
learns a fixed batch, generates the same tokens with and without the KV cache (past block_size
too) and survives a checkpoint; train.py and sample.py run with the switches on.
CPU, float32, seeded, tiny configs.
"""

import itertools
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import model as M
from checkpoint import load_checkpoint
from model import GPT, GPTConfig
from test_model import one_thread  # noqa: F401 (an autouse fixture: one torch thread in this module too)
from test_scripts import TINY as TINY_FLAGS, assert_one_line_error, repo, run  # noqa: F401 (repo is a fixture)


TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=65, dropout=0.0)  # head size 8
MODERN = dict(rope=True, rmsnorm=True, swiglu=True, n_kv_head=2, qk_norm=True)


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**dict(TINY, **overrides)))
    m.eval()
    return m


def random_idx(B=3, T=16, vocab_size=65, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (B, T), generator=g)


# -----------------------------------------------------------------------------
# rotary position embeddings


def test_rotary_known_values():
    """Position 0 is the identity; at position 1 the first pair (dims 0 and hs/2) turns by 1 radian
    and the last by theta^(-(hs-2)/hs) radians; the norm of every vector is kept."""
    hs = 8
    x = torch.randn(2, 3, 4, hs)
    cos, sin = M.rotary(torch.arange(4), hs)
    assert cos.shape == sin.shape == (4, hs // 2)
    y = M.apply_rotary(x, cos, sin)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0], atol=0, rtol=0)
    for i, angle in ((0, 1.0), (hs // 2 - 1, 10000 ** (-(hs - 2) / hs))):
        a, b = x[:, :, 1, i], x[:, :, 1, i + hs // 2]
        torch.testing.assert_close(y[:, :, 1, i], a * math.cos(angle) - b * math.sin(angle))
        torch.testing.assert_close(y[:, :, 1, i + hs // 2], a * math.sin(angle) + b * math.cos(angle))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_rotary_scores_depend_only_on_relative_position():
    """q rotated at positions p and k at positions p' give the q.k scores of q at p + s and k at
    p' + s, for any shift s; a shift of q alone changes them."""
    hs, T = 16, 10
    q, k = torch.randn(2, 3, T, hs, dtype=torch.float64), torch.randn(2, 3, T, hs, dtype=torch.float64)
    pos = torch.arange(T)

    def scores(q_shift, k_shift):
        rq = M.apply_rotary(q, *(t.double() for t in M.rotary(pos + q_shift, hs)))
        rk = M.apply_rotary(k, *(t.double() for t in M.rotary(pos + k_shift, hs)))
        return rq @ rk.transpose(-2, -1)  # (B, nh, T, T)

    base = scores(0, 0)
    for s in (1, 7, 100):
        torch.testing.assert_close(scores(s, s), base, atol=1e-4, rtol=0)  # angles are float32
    assert (scores(3, 0) - base).abs().max() > 0.1  # not merely insensitive to position
    assert (base - q @ k.transpose(-2, -1)).abs().max() > 0.1  # and the rotation does something


def test_rope_model_has_no_wpe_and_counts():
    """With rope there is no wpe: get_num_params subtracts nothing, crop_block_size crops nothing,
    and the logits of the first 8 tokens are the same before and after cropping to 8."""
    m = tiny(rope=True)
    assert m.transformer.wpe is None and not any('wpe' in n for n in m.state_dict())
    total = sum(p.numel() for p in m.parameters())
    assert m.get_num_params() == m.get_num_params(non_embedding=False) == total
    L, H, Q, T = 2, 4, 8, 16
    assert m.flops_per_token() == 6 * total + 12 * L * H * Q * T
    idx = random_idx(T=8)
    with torch.no_grad():
        before, _ = m(idx, torch.zeros_like(idx))
        m.crop_block_size(8)
        after, _ = m(idx, torch.zeros_like(idx))
    assert m.config.block_size == 8 and torch.equal(before, after)


# -----------------------------------------------------------------------------
# grouped-query attention, parameter counts


def gpt2_forward(sd, idx, n_head):
    """GPT-2's forward pass written out from a state_dict alone, in float64: learned positions, pre-LayerNorm
    blocks of causal softmax attention and an exact-GELU MLP, a final LayerNorm, lm_head tied to wte (the
    GPT-2 paper, section 2.3; OpenAI's src/model.py). The independent computation model.py must equal."""
    w = {k: v.double() for k, v in sd.items()}
    ln = lambda x, name: F.layer_norm(x, x.shape[-1:], w[name + '.weight'], w[name + '.bias'], 1e-5)
    linear = lambda x, name: x @ w[name + '.weight'].T + w[name + '.bias']
    B, T = idx.shape
    x = w['transformer.wte.weight'][idx] + w['transformer.wpe.weight'][:T]  # (B, T, C)
    C = x.size(-1)
    hs = C // n_head
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)  # key j > query i
    for layer in range(len({k.split('.')[2] for k in w if k.startswith('transformer.h.')})):
        p = f'transformer.h.{layer}.'
        q, k, v = linear(ln(x, p + 'ln_1'), p + 'attn.c_attn').split(C, dim=-1)  # 3 x (B, T, C)
        heads = lambda t: t.reshape(B, T, n_head, hs).permute(0, 2, 1, 3)  # (B, nh, T, hs)
        scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(hs)  # (B, nh, T, T)
        y = scores.masked_fill(future, float('-inf')).softmax(-1) @ heads(v)  # (B, nh, T, hs)
        x = x + linear(y.permute(0, 2, 1, 3).reshape(B, T, C), p + 'attn.c_proj')  # heads side by side
        x = x + linear(F.gelu(linear(ln(x, p + 'ln_2'), p + 'mlp.c_fc')), p + 'mlp.c_proj')
    return ln(x, 'transformer.ln_f') @ w['transformer.wte.weight'].T  # (B, T, vocab)


@pytest.mark.parametrize('flash', [True, False])
@pytest.mark.parametrize('n_kv_head', [0, 4])
def test_plain_attention_equals_gpt2_written_out(flash, n_kv_head):
    """The default model, and n_kv_head = n_head (grouped-query attention with groups of one), on both
    attention paths: the logits of GPT-2 computed here from the same weights."""
    m = tiny(flash=flash, n_kv_head=n_kv_head)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)  # lively weights: attention far from uniform
    idx = random_idx()
    with torch.no_grad():
        logits, _ = m(idx, idx)  # (B, T, vocab): with targets, every position's
    torch.testing.assert_close(logits.double(), gpt2_forward(m.state_dict(), idx, n_head=4), atol=1e-5, rtol=0)


def repeated_kv_state_dict(gqa):
    """The state of a plain model equal to gqa: c_attn's key and value rows of each kv head
    repeated for each query head of its group (query head h reads kv head h // group)."""
    cfg = gqa.config
    hs, group = cfg.n_embd // cfg.n_head, cfg.n_head // cfg.n_kv_head
    sd = dict(gqa.state_dict())
    for name in [n for n in sd if 'c_attn' in n]:
        q, k, v = sd[name].split([cfg.n_embd, cfg.n_kv_head * hs, cfg.n_kv_head * hs], dim=0)
        rep = lambda t: t.view(cfg.n_kv_head, hs, *t.shape[1:]).repeat_interleave(group, dim=0).flatten(0, 1)
        sd[name] = torch.cat((q, rep(k), rep(v)), dim=0)  # (3C, C) or (3C,)
    return sd


@pytest.mark.parametrize('flash', [True, False])
@pytest.mark.parametrize('n_kv_head', [1, 2])
def test_gqa_equals_plain_attention_with_repeated_kv_heads(flash, n_kv_head):
    """Multi-query (1) and grouped (2 of 4) attention give the logits of a plain model whose key and
    value heads are copies, group by group; c_attn and the KV cache hold only n_kv_head heads."""
    gqa = tiny(flash=flash, n_kv_head=n_kv_head, rope=True)
    with torch.no_grad():
        for p in gqa.parameters():
            p.normal_(0.0, 0.3)  # lively weights: attention far from uniform
    plain = tiny(seed=1, flash=flash, rope=True)
    plain.load_state_dict(repeated_kv_state_dict(gqa))
    C, hs = 32, 8
    assert gqa.transformer.h[0].attn.c_attn.weight.shape == (C + 2 * n_kv_head * hs, C)
    idx = random_idx()
    kv_cache = [M.KVCache() for _ in gqa.transformer.h]
    with torch.no_grad():
        expected, _ = plain(idx, idx)
        torch.testing.assert_close(gqa(idx, idx)[0], expected, atol=1e-5, rtol=0)
        cached = torch.cat([gqa(idx[:, a:b], idx[:, a:b].contiguous(), kv_cache=kv_cache)[0]
                            for a, b in ((0, 9), (9, 10), (10, 16))], dim=1)
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=0)
    assert kv_cache[0].k.shape == kv_cache[0].v.shape == (3, n_kv_head, 16, hs)  # (B, nkv, T, hs)


def test_bad_n_kv_head_and_odd_rope_head_size_raise():
    with pytest.raises(ValueError, match=r'n_head 4 is not divisible by n_kv_head 3.*\[1, 2, 4\]'):
        GPTConfig(**dict(TINY, n_kv_head=3))
    with pytest.raises(ValueError, match=r'n_kv_head 8'):
        GPTConfig(**dict(TINY, n_kv_head=8))
    with pytest.raises(ValueError, match=r'n_kv_head -1'):
        GPTConfig(**dict(TINY, n_kv_head=-1))
    with pytest.raises(ValueError, match=r'head size .* = 5 is odd'):
        GPTConfig(**dict(TINY, n_head=2, n_embd=10, rope=True))


def test_parameter_counts_by_hand():
    """Each switch's parameters, written out for C = 32, 4 heads of 8, L = 2, V = 65, T = 16:
    SwiGLU's hidden width is 64 * round(8C / 3 / 64) (= 64 here; 320 at C = 128, 1024 at 384)."""
    C, L, V, T, hs = 32, 2, 65, 16, 8
    plain = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    base = V * C + 2 * C  # wte (tied with lm_head), ln_f
    assert tiny().get_num_params(non_embedding=False) == base + T * C + L * plain
    H = 64
    swiglu = plain - (4 * C * C + 4 * C) - (4 * C * C + C) + (C * 2 * H + 2 * H) + (H * C + C)
    assert tiny(swiglu=True).get_num_params() == base + L * swiglu  # non-embedding: no wpe
    assert [M.MLP(GPTConfig(n_embd=c, n_head=1, swiglu=True)).c_proj.in_features for c in (128, 384, 768)] == [320, 1024, 2048]
    gqa = plain - (3 * C * C + 3 * C) + (C + 2 * hs) * (C + 1)  # one kv head: c_attn (C + 2 hs) x C, plus bias
    assert tiny(n_kv_head=1).get_num_params() == base + L * gqa
    rms = plain - 2 * C  # RMSNorm: a gain, no bias (ln_1, ln_2), and ln_f too
    assert tiny(rmsnorm=True).get_num_params() == base - C + L * rms
    assert tiny(qk_norm=True).get_num_params() == base + L * (plain + 2 * hs)  # q_norm, k_norm gains
    assert tiny(rope=True).get_num_params(non_embedding=False) == base + L * plain  # no wpe


def test_rmsnorm_value():
    """RMSNorm divides by the root mean square, without subtracting the mean (gain 1 at init)."""
    m = tiny(rmsnorm=True)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0] * 8])
    expected = x / math.sqrt(7.5 + 1e-5)  # mean of squares of 1..4 is 30 / 4
    torch.testing.assert_close(m.transformer.ln_f(x), expected)


def test_everything_off_is_gpt2_exactly():
    """The switches at their defaults build GPT-2's parameters, named and shaped as its checkpoints, drawn
    as the GPT-2 paper says: N(0, 0.02), the residual projections N(0, 0.02 / sqrt(2 n_layer)) (section
    2.3), zero biases, LayerNorms at gain 1; lm_head is wte (tied)."""
    C, L, V, T = 32, 2, 65, 16
    m = tiny(rope=False, rmsnorm=False, swiglu=False, n_kv_head=0, qk_norm=False)
    block = {'ln_1.weight': (C,), 'ln_1.bias': (C,), 'attn.c_attn.weight': (3 * C, C), 'attn.c_attn.bias': (3 * C,),
             'attn.c_proj.weight': (C, C), 'attn.c_proj.bias': (C,), 'ln_2.weight': (C,), 'ln_2.bias': (C,),
             'mlp.c_fc.weight': (4 * C, C), 'mlp.c_fc.bias': (4 * C,), 'mlp.c_proj.weight': (C, 4 * C),
             'mlp.c_proj.bias': (C,)}
    shapes = {'transformer.wte.weight': (V, C), 'transformer.wpe.weight': (T, C),
              **{f'transformer.h.{i}.{k}': s for i in range(L) for k, s in block.items()},
              'transformer.ln_f.weight': (C,), 'transformer.ln_f.bias': (C,), 'lm_head.weight': (V, C)}
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert m.lm_head.weight is m.transformer.wte.weight
    torch.manual_seed(0)
    big = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=128, block_size=64, vocab_size=512))  # enough draws for a std
    for name, p in big.state_dict().items():
        if name.endswith('bias'):
            assert (p == 0).all(), name
        elif '.ln_' in name:
            assert (p == 1).all(), name
        else:
            want = 0.02 / math.sqrt(2 * 8) if name.endswith('c_proj.weight') else 0.02
            assert p.std().item() == pytest.approx(want, rel=0.1) and abs(p.mean().item()) < want / 10, name


# -----------------------------------------------------------------------------
# every combination: learns, caches exactly, round-trips through a checkpoint

COMBOS = [dict(rope=r, rmsnorm=n, swiglu=s, n_kv_head=kv, qk_norm=qk, flash=f)
          for r, n, s, kv, qk, f in itertools.product((False, True), (False, True), (False, True), (0, 1, 2),
                                                      (False, True), (True, False))]


def combo_id(c):
    return '-'.join([k for k in ('rope', 'rmsnorm', 'swiglu', 'qk_norm') if c[k]] + [f"kv{c['n_kv_head']}"] +
                    ['flash' if c['flash'] else 'manual'])


def generate_recording(m, idx, **kwargs):
    """generate(), and the next-token logits of each of its steps (a hook on lm_head)."""
    logits = []
    hook = m.lm_head.register_forward_hook(lambda mod, args, out: logits.append(out[:, -1, :].clone()))
    try:
        return m.generate(idx, **kwargs), logits
    finally:
        hook.remove()


@pytest.mark.parametrize('combo', COMBOS, ids=combo_id)
def test_combination_trains_caches_and_round_trips(combo, tmp_path):
    m = tiny(**combo)
    m.train()
    # 1) 15 AdamW steps on one fixed batch: the loss falls from ~ln(65) = 4.17 to well below (to ~1.0 in all 96
    # combinations; 30 steps took it to ~0.2, twice the time for the same verdict)
    x, y = random_idx(B=4, T=16, seed=2), random_idx(B=4, T=16, seed=3)
    optimizer = m.configure_optimizers(weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.99), device_type='cpu')
    losses = []
    for _ in range(15):
        _, loss = m(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert abs(losses[0] - math.log(65)) < 0.15 and losses[-1] < 0.5 * losses[0], losses
    m.eval()

    # 2) greedy generate with and without the KV cache, from 3 tokens to 2 * block_size + 5:
    # the same tokens, from logits equal at every step; prompted with the start of the memorised
    # batch, the trained model's output varies
    idx = x[:2, :3]
    cached, logits_c = generate_recording(m, idx, max_new_tokens=37, temperature=0, use_cache=True)
    plain, logits_p = generate_recording(m, idx, max_new_tokens=37, temperature=0, use_cache=False)
    assert torch.equal(cached, plain) and len(set(cached[:, 3:].flatten().tolist())) > 1
    for t, (a, b) in enumerate(zip(logits_c, logits_p)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"step {t}")

    # 3) a checkpoint as train.py writes it loads back to the same model: the same logits
    path = tmp_path / 'ckpt.pt'
    model_args = {k: v for k, v in vars(m.config).items()}
    torch.save({'model': m.state_dict(), 'model_args': model_args, 'iter_num': 15}, path)
    loaded, _ = load_checkpoint(path, 'cpu')
    loaded.eval()
    assert loaded.config == m.config
    with torch.no_grad():
        assert torch.equal(loaded(x, y)[0], m(x, y)[0])


def test_checkpoint_without_the_new_keys_loads_as_gpt2(tmp_path):
    """model_args of a checkpoint written before the switches (or by nanoGPT) lack their keys:
    it loads, with every switch at its default."""
    m = tiny()
    args = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=65, bias=True, dropout=0.0)
    torch.save({'model': m.state_dict(), 'model_args': args, 'iter_num': 0}, tmp_path / 'ckpt.pt')
    loaded, _ = load_checkpoint(tmp_path / 'ckpt.pt', 'cpu')
    assert loaded.config == m.config
    assert not (loaded.config.rope or loaded.config.rmsnorm or loaded.config.swiglu or loaded.config.qk_norm)


# -----------------------------------------------------------------------------
# the real scripts

MODERN_FLAGS = ['--rope=True', '--rmsnorm=True', '--swiglu=True', '--n_kv_head=1', '--qk_norm=True']


def test_train_resume_and_sample_a_modern_model(repo):  # noqa: F811 (repo is the imported fixture)
    """train.py trains a model with every switch on (multi-query, the manual attention path),
    writes the switches into its checkpoint, resumes it (refusing a changed switch in one line),
    and sample.py's greedy text is that of generate without the cache."""
    out = '--out_dir=out-modern'
    common = [*TINY_FLAGS, *MODERN_FLAGS, '--flash=False', '--n_head=4', '--n_embd=32', out,
              '--learning_rate=1e-2', '--warmup_iters=2', '--lr_decay_iters=20', '--eval_interval=10']
    p = run(repo, 'train.py', *common, '--max_iters=20')
    val = [float(v) for v in re.findall(r'val loss ([0-9.]+)', p.stdout)]
    assert len(val) == 3 and val[-1] < val[0] - 0.3, p.stdout  # steps 0, 10, 20: it learns
    ckpt = torch.load(repo / out.split('=')[1] / 'ckpt.pt', weights_only=True)
    args = {**ckpt['model_args'], **ckpt['arch']}  # nanoGPT's keys, and ours beside them (checkpoint.py)
    assert {k: args[k] for k in MODERN} == dict(MODERN, n_kv_head=1)
    assert 'transformer.wpe.weight' not in ckpt['model'] and 'transformer.h.0.attn.q_norm.weight' in ckpt['model']

    run(repo, 'train.py', *common, '--max_iters=22', '--init_from=resume')
    bad = run(repo, 'train.py', *common, '--n_kv_head=2', '--max_iters=24', '--init_from=resume', ok=False)
    assert_one_line_error(bad, 'the checkpoint has n_kv_head = 1, the settings say n_kv_head = 2')

    # sample.py (with the KV cache) draws greedily what generate without the cache draws, past block_size
    p = run(repo, 'sample.py', out, '--start=ROMEO:', '--temperature=0', '--num_samples=1', '--max_new_tokens=40',
            '--dtype=float32')
    chars = json.loads((repo / 'data' / 'shakespeare_char' / 'meta.json').read_text())['tokenizer']['chars']
    m, _ = load_checkpoint(repo / out.split('=')[1] / 'ckpt.pt', 'cpu')
    m.eval()
    idx = torch.tensor([[chars.index(c) for c in 'ROMEO:']])
    text = ''.join(chars[i] for i in m.generate(idx, 40, temperature=0, use_cache=False)[0].tolist())
    assert text in p.stdout, (text, p.stdout)


def test_train_refuses_bad_n_kv_head_in_one_line(repo):  # noqa: F811
    p = run(repo, 'train.py', *TINY_FLAGS, '--n_head=4', '--n_embd=32', '--n_kv_head=3', '--max_iters=1',
            '--out_dir=out-badkv', ok=False)
    assert_one_line_error(p, 'n_head 4 is not divisible by n_kv_head 3')
