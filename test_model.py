"""
Tests of model.py that check numbers: a known value (ln(vocab) at init, GPT-2's init
statistics, parameter and FLOP counts written out by hand), invariants (causality, the two
attention paths agreeing, weight tying, cropping), generate() against a hand-written loop, and
generate() with the KV cache against generate() without it.
CPU, float32, seeded, tiny configs; each test takes a second or less.
"""

import math
import re

import pytest
import torch

import model as M
from model import GPT, GPTConfig

@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine the idle-waiting
    of a second intra-op thread makes them ~100x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.0)


def tiny(seed=0, **overrides):
    """A freshly initialised tiny GPT in eval mode (seeded: the same seed, the same weights)."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**dict(TINY, **overrides)))
    m.eval()
    return m


def lively(m, seed=5):
    """Re-draw every weight with std 0.3. At GPT-2's init a tied-embedding model predicts little
    more than "repeat the last token", so greedy output is constant and could not tell a right
    context from a wrong one; with larger weights the argmax depends on the whole context."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def random_idx(B=3, T=16, vocab_size=65, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (B, T), generator=g)


# -----------------------------------------------------------------------------
# forward: loss at init, the two attention paths, causality


def test_initial_loss_is_ln_vocab():
    """At init the logits are nearly uniform, so the loss on random targets is ~ln(vocab_size)."""
    m = tiny()
    idx, targets = random_idx(B=8, seed=1), random_idx(B=8, seed=2)
    with torch.no_grad():
        _, loss = m(idx, targets)
    assert abs(loss.item() - math.log(65)) < 0.1, loss.item()


def flash_and_manual_pair(seed=0):
    """Two models with the same weights: one with the fused attention, one with the manual one."""
    flash = tiny(seed, flash=True)
    manual = tiny(seed + 1, flash=False)  # a different init, overwritten below
    manual.load_state_dict(flash.state_dict())
    assert flash.transformer.h[0].attn.flash and not manual.transformer.h[0].attn.flash
    return flash, manual


def test_flash_and_manual_attention_agree():
    """The fused and the written-out attention give the same logits and loss (eval mode)."""
    flash, manual = flash_and_manual_pair()
    idx, targets = random_idx(), random_idx(seed=2)
    with torch.no_grad():
        logits_f, loss_f = flash(idx, targets)
        logits_m, loss_m = manual(idx, targets)
    torch.testing.assert_close(logits_m, logits_f, atol=1e-5, rtol=0)
    assert abs(loss_m.item() - loss_f.item()) < 1e-5
    # and they are not trivially equal because the logits are all the same
    assert logits_f.std() > 1e-3


def test_manual_attention_in_a_model_cast_to_bfloat16():
    """A model cast to bf16 (no autocast) runs the written-out attention in bf16, and its logits
    are float32's to bf16 precision."""
    m = lively(tiny(flash=False))
    idx = random_idx()
    with torch.no_grad():
        want, _ = m(idx, idx)
        got, _ = m.to(torch.bfloat16)(idx, idx)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1 * want.abs().max().item(), rtol=0)


def test_flash_and_manual_attention_gradients_agree():
    """Backpropagating the same loss through both attention paths gives the same gradients."""
    flash, manual = flash_and_manual_pair()
    idx, targets = random_idx(), random_idx(seed=2)
    for m in (flash, manual):
        m.zero_grad()
        _, loss = m(idx, targets)
        loss.backward()
    grads_f = dict((n, p.grad) for n, p in flash.named_parameters())
    grads_m = dict((n, p.grad) for n, p in manual.named_parameters())
    assert grads_f.keys() == grads_m.keys()
    for name in grads_f:
        assert grads_f[name] is not None, name
        torch.testing.assert_close(grads_m[name], grads_f[name], atol=1e-5, rtol=0, msg=name)
    # the attention weights do receive a gradient, so the comparison covers the attention
    assert grads_f['transformer.h.0.attn.c_attn.weight'].abs().max() > 0


@pytest.mark.parametrize('flash', [True, False])
def test_causality(flash):
    """Changing the token at position t changes no logits before t (and does change those at t)."""
    m = tiny(flash=flash)
    idx = random_idx(B=1, T=16)
    targets = torch.zeros_like(idx)  # given, so all T positions' logits come back
    with torch.no_grad():
        base, _ = m(idx, targets)
        for t in range(16):
            changed = idx.clone()
            changed[0, t] = (idx[0, t] + 1) % 65
            logits, _ = m(changed, targets)
            assert torch.equal(logits[:, :t], base[:, :t]), \
                f"position {t} leaked into earlier positions"
            assert not torch.allclose(logits[:, t], base[:, t]), \
                f"position {t} did not change its own logits"


@pytest.mark.parametrize('arch', [dict(flash=True), dict(flash=False),
                                  dict(rope=True, qk_norm=True, n_kv_head=1),
                                  dict(rmsnorm=True, swiglu=True, bias=False)])
def test_forward_without_targets_returns_last_position(arch):
    """Without targets forward returns (B, 1, vocab) logits: the last position of the full logits;
    after a cache, too, which still gets every key and value."""
    m = lively(tiny(**arch))
    idx = random_idx(B=2, T=11)
    kv_cache = [M.KVCache() for _ in m.transformer.h]
    with torch.no_grad():
        full, loss = m(idx, torch.zeros_like(idx))
        last, no_loss = m(idx)
        m(idx[:, :6], kv_cache=kv_cache)
        after_cache, _ = m(idx[:, 6:], kv_cache=kv_cache)
    assert full.shape == (2, 11, 65) and loss is not None
    assert last.shape == (2, 1, 65) and no_loss is None
    torch.testing.assert_close(last, full[:, [-1], :], atol=1e-5, rtol=0)
    torch.testing.assert_close(after_cache, full[:, [-1], :], atol=1e-5, rtol=0)
    assert all(len(c) == 11 for c in kv_cache)  # every block's keys and values of all 11 positions


def test_forward_longer_than_block_size_raises():
    """A sequence longer than block_size is refused with a message naming both lengths."""
    m = tiny()
    with pytest.raises(ValueError, match=r'17.*16'):
        m(random_idx(B=1, T=17))


# -----------------------------------------------------------------------------
# weights: tying, optimizer groups, initialisation, parameter and FLOP counts


def test_weight_tying_survives_an_optimizer_step():
    """wte and lm_head are one tensor, and stay one after AdamW updates it."""
    m = tiny()
    m.train()
    wte, head = m.transformer.wte.weight, m.lm_head.weight
    assert wte.data_ptr() == head.data_ptr()
    before = wte.detach().clone()
    opt = m.configure_optimizers(weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.95),
                                 device_type='cpu')
    _, loss = m(random_idx(), random_idx(seed=2))
    loss.backward()
    opt.step()
    assert not torch.equal(wte, before), "the step did not change the tied weight"
    assert wte.data_ptr() == head.data_ptr()
    assert torch.equal(m.transformer.wte.weight, m.lm_head.weight)


def test_optimizer_groups_cover_each_parameter_once():
    """Every parameter is in exactly one group; matrices and embeddings decay, 1-D tensors not."""
    m = tiny()
    opt = m.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95),
                                 device_type='cpu')
    params = list(m.parameters())
    grouped = [p for g in opt.param_groups for p in g['params']]
    assert len(grouped) == len(params) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in params}
    for g in opt.param_groups:
        for p in g['params']:
            assert g['weight_decay'] == (0.1 if p.dim() >= 2 else 0.0), (p.shape, g['weight_decay'])
    # both kinds are present, so the check above tests both branches
    assert any(p.dim() >= 2 for p in params) and any(p.dim() == 1 for p in params)
    assert opt.defaults['lr'] == 1e-3 and opt.defaults['betas'] == (0.9, 0.95)


def test_gpt2_initialisation():
    """GPT-2's init: weights ~N(0, 0.02), residual projections ~N(0, 0.02/sqrt(2*n_layer)),
    biases zero, LayerNorm gains one."""
    torch.manual_seed(0)
    n_layer = 3
    m = GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=256, block_size=16, vocab_size=65))
    residual_std = 0.02 / math.sqrt(2 * n_layer)
    seen_proj = 0
    for name, p in m.named_parameters():
        if name.endswith('c_proj.weight'):
            seen_proj += 1
            assert abs(p.std().item() - residual_std) < 0.1 * residual_std, (name, p.std().item())
            assert abs(p.mean().item()) < 0.1 * residual_std, name
        elif name.endswith('.weight') and p.dim() == 2:
            assert abs(p.std().item() - 0.02) < 0.1 * 0.02, (name, p.std().item())
            assert abs(p.mean().item()) < 0.1 * 0.02, name
        elif name.endswith('.bias'):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:  # LayerNorm gains: ln_1, ln_2, ln_f
            assert re.search(r'ln_(1|2|f)\.weight$', name), name
            assert torch.equal(p, torch.ones_like(p)), name
    assert seen_proj == 2 * n_layer  # attn.c_proj and mlp.c_proj in each block


def hand_count(L, C, V, T):
    """Parameters of a GPT with biases, layer by layer (wte and lm_head tied: counted once)."""
    per_block = (
        2 * C  # ln_1 weight, bias
        + 3 * C * C + 3 * C  # attn.c_attn
        + C * C + C  # attn.c_proj
        + 2 * C  # ln_2
        + 4 * C * C + 4 * C  # mlp.c_fc
        + 4 * C * C + C  # mlp.c_proj
    )  # = 12 C^2 + 13 C
    return dict(wte=V * C, wpe=T * C, blocks=L * per_block, ln_f=2 * C)


def test_get_num_params():
    """get_num_params counts every parameter once (tied ones once), minus wpe when non_embedding."""
    m = tiny()
    total = sum(p.numel() for p in m.parameters())
    assert m.get_num_params(non_embedding=False) == total
    assert m.get_num_params(non_embedding=True) == total - m.transformer.wpe.weight.numel()
    assert m.get_num_params() == m.get_num_params(non_embedding=True)  # the default
    c = hand_count(L=2, C=32, V=65, T=16)
    by_formula = 2 * (12 * 32 ** 2 + 13 * 32) + 65 * 32 + 16 * 32 + 2 * 32
    assert m.get_num_params(non_embedding=False) == sum(c.values()) == by_formula
    assert m.get_num_params(non_embedding=True) == sum(c.values()) - c['wpe']
    # a known value: blocks 25,408 + wte 2,080 + wpe 512 + ln_f 64
    assert sum(c.values()) == 28_064


def test_get_num_params_gpt2_124m():
    """GPT-2 small (vocab 50257, 12 x 768, block 1024) has the well-known 124,439,808 parameters."""
    c = hand_count(L=12, C=768, V=50257, T=1024)
    assert sum(c.values()) == 124_439_808
    with torch.device('meta'):  # shapes only: no memory, no init cost
        m = GPT(GPTConfig(vocab_size=50257))
    assert m.get_num_params(non_embedding=False) == 124_439_808
    assert m.get_num_params() == 124_439_808 - 1024 * 768


def test_flops_per_token_and_mfu():
    """flops_per_token = 6 N + 12 L H Q T (PaLM appendix B); estimate_mfu: rate over peak."""
    m = tiny()
    L, H, C, T = 2, 2, 32, 16
    Q = C // H
    N = sum(hand_count(L=L, C=C, V=65, T=T).values()) - T * C  # non-embedding count
    expected = 6 * N + 12 * L * H * Q * T
    assert m.flops_per_token() == expected == 6 * 27_552 + 12 * 2 * 2 * 16 * 16
    # 1000 tokens in 0.5 s against a peak of 1e9 FLOP/s
    mfu = m.estimate_mfu(tokens_per_iter=1000, dt=0.5, peak_flops=1e9)
    assert mfu == pytest.approx(expected * 1000 / 0.5 / 1e9)


# -----------------------------------------------------------------------------
# generate


def test_greedy_generate_matches_hand_written_loop():
    """temperature=0 appends argmax of forward's last-position logits, one token at a time."""
    m = lively(tiny())
    idx = random_idx(B=2, T=4)
    out = m.generate(idx, max_new_tokens=6, temperature=0)
    expected = idx
    with torch.no_grad():
        for _ in range(6):
            logits, _ = m(expected)
            expected = torch.cat((expected, logits[:, -1, :].argmax(dim=-1, keepdim=True)), dim=1)
    assert out.shape == (2, 10)
    assert torch.equal(out[:, :4], idx)
    assert torch.equal(out, expected)


def test_generate_past_block_size_crops_the_context():
    """From a block_size-long prompt, each of block_size+5 new tokens is the argmax of the model
    applied to the last block_size tokens."""
    m = lively(tiny())
    bs = m.config.block_size
    idx = random_idx(B=2, T=bs)
    out = m.generate(idx, max_new_tokens=bs + 5, temperature=0)
    assert out.shape == (2, 2 * bs + 5)
    assert torch.equal(out[:, :bs], idx)
    # the new tokens vary, so a model fed the wrong window (the first block_size tokens) differs
    assert len(set(out[:, bs:].flatten().tolist())) > 1
    with torch.no_grad():
        for t in range(bs, 2 * bs + 5):
            logits, _ = m(out[:, t - bs:t])
            assert torch.equal(out[:, t], logits[:, -1, :].argmax(dim=-1)), f"token {t}"


def test_generate_rejects_negative_temperature():
    """A negative temperature is an error, not a silently inverted distribution."""
    m = tiny()
    with pytest.raises(ValueError, match='-0.5'):
        m.generate(random_idx(B=1, T=3), max_new_tokens=1, temperature=-0.5)


def test_generate_top_k():
    """top_k larger than the vocabulary, or 0, samples from all of it; top_k=1 is greedy."""
    m = lively(tiny())
    idx = random_idx(B=2, T=3)
    torch.manual_seed(0)
    wide = m.generate(idx, max_new_tokens=8, temperature=1.0, top_k=1000)
    torch.manual_seed(0)
    untruncated = m.generate(idx, max_new_tokens=8, temperature=1.0, top_k=None)
    assert wide.shape == (2, 11) and int(wide.max()) < 65
    assert torch.equal(wide, untruncated)  # k >= vocab removes nothing: the same samples
    torch.manual_seed(0)
    all_kept = m.generate(idx, max_new_tokens=8, temperature=1.0, top_k=0)  # top_k=0 keeps all
    assert torch.equal(all_kept, untruncated)
    greedy = m.generate(idx, max_new_tokens=8, temperature=0)
    torch.manual_seed(0)
    top1 = m.generate(idx, max_new_tokens=8, temperature=1.0, top_k=1)
    assert torch.equal(top1, greedy)


def test_generate_never_draws_padding_ids():
    """With vocab_size below the model's (padded) vocabulary, ids at or above it are never drawn,
    even where the model gives them most of the probability."""
    m = tiny()
    with torch.no_grad():
        m.lm_head.weight[60:] = 0.0  # tied to wte: padding rows as in train.py, then made likely
        m.lm_head.weight[60:, 0] = 5.0
    idx = random_idx(B=4, T=3, vocab_size=60)
    torch.manual_seed(0)
    free = m.generate(idx, max_new_tokens=20, temperature=1.0)
    assert int(free.max()) >= 60  # the check below can fail
    torch.manual_seed(0)
    for t in (1.0, 0):
        assert int(m.generate(idx, max_new_tokens=20, temperature=t, vocab_size=60).max()) < 60


# -----------------------------------------------------------------------------
# generate with a KV cache: the same numbers as the full forward it replaces


@pytest.mark.parametrize('flash', [True, False])
def test_forward_with_kv_cache_matches_full_forward(flash):
    """A sequence fed in pieces (5, 1, 3, then 7 tokens) through a KV cache gives the logits of
    one full forward at every position: the positions continue and the causal mask shifts."""
    m = lively(tiny(flash=flash))
    idx = random_idx(B=3, T=16)
    targets = torch.zeros_like(idx)  # given, so all positions' logits come back
    kv_cache = [M.KVCache() for _ in m.transformer.h]
    with torch.no_grad():
        full, _ = m(idx, targets)
        pieces = [m(idx[:, a:b], targets[:, a:b].contiguous(), kv_cache=kv_cache)[0]
                  for a, b in ((0, 5), (5, 6), (6, 9), (9, 16))]
    assert all(len(c) == 16 for c in kv_cache)
    assert kv_cache[0].k.shape == (3, 2, 16, 16)  # (B, nh, T, hs)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
    # no position left for a 17th token
    with pytest.raises(ValueError, match=r'16 cached \+ 1 new.*16'):
        m(idx[:, :1], kv_cache=kv_cache)


def generate_recording(m, idx, max_new_tokens, **kwargs):
    """generate(), plus what each of its steps fed to the model (the number of tokens) and the
    next-token logits it got, read with forward hooks."""
    lengths, logits = [], []
    hooks = [m.transformer.wte.register_forward_hook(
                 lambda mod, args, out: lengths.append(args[0].size(1))),
             m.lm_head.register_forward_hook(
                 lambda mod, args, out: logits.append(out[:, -1, :].clone()))]
    try:
        out = m.generate(idx, max_new_tokens, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return out, lengths, logits


@pytest.mark.parametrize('flash', [True, False])
def test_cached_generate_logits_equal_uncached(flash):
    """Greedy, batch 3, from 4 tokens to well past block_size (16): the cached and the uncached
    generate draw the same tokens from logits equal within 1e-5 at every step. The cached one
    feeds the prompt, then one token per step; past block_size both run the cropped window."""
    m = lively(tiny(flash=flash))
    idx = random_idx(B=3, T=4)
    n = 2 * 16 + 5
    cached, len_c, logits_c = generate_recording(m, idx, n, temperature=0, use_cache=True)
    plain, len_p, logits_p = generate_recording(m, idx, n, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)
    assert cached.shape == (3, 4 + n) and len(set(cached[:, 4:].flatten().tolist())) > 1
    # tokens 5..16 from the cache, then the window slides
    assert len_c == [4] + [1] * 12 + [16] * (n - 13)
    assert len_p == list(range(4, 17)) + [16] * (n - 13)
    assert len(logits_c) == len(logits_p) == n
    for t, (a, b) in enumerate(zip(logits_c, logits_p)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"step {t}")


@pytest.mark.parametrize('flash', [True, False])
def test_cached_sampling_equals_uncached(flash):
    """Sampling (temperature 1, top_k 10) with the same seed draws the same tokens with and
    without the cache, batch 4, past block_size; the samples are not all alike."""
    m = lively(tiny(flash=flash))
    idx = random_idx(B=4, T=2)
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        outs.append(m.generate(idx, max_new_tokens=30, temperature=1.0, top_k=10,
                               use_cache=use_cache))
    assert torch.equal(outs[0], outs[1])
    assert len({tuple(row) for row in outs[0][:, 2:].tolist()}) == 4  # four different samples


def test_kv_cache_under_bfloat16_autocast():
    """Under CPU bf16 autocast the cache holds bfloat16 keys and values, and the cached logits
    stay within bfloat16's rounding of the uncached ones."""
    m = lively(tiny())
    idx = random_idx(B=2, T=3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, _, logits_c = generate_recording(m, idx, 10, temperature=0, use_cache=True)
        kv_cache = [M.KVCache() for _ in m.transformer.h]
        with torch.no_grad():
            m(idx, kv_cache=kv_cache)
        _, _, logits_p = generate_recording(m, idx, 10, temperature=0, use_cache=False)
    assert kv_cache[0].k.dtype == torch.bfloat16
    # the first steps share their context (later ones may draw a different token after a near-tie)
    for a, b in zip(logits_c[:3], logits_p[:3]):
        torch.testing.assert_close(a.float(), b.float(), atol=0.1, rtol=0.02)


# -----------------------------------------------------------------------------
# config, crop_block_size, checkpoints


@pytest.mark.parametrize('field', ['n_head', 'n_layer', 'block_size', 'vocab_size', 'n_embd'])
def test_config_rejects_non_positive_sizes(field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{field: 0})


def test_config_rejects_dropout_outside_0_1():
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match='dropout'):
            GPTConfig(dropout=p)


def test_config_rejects_n_embd_not_divisible_by_n_head():
    """n_embd % n_head != 0 is refused with a message naming both numbers."""
    with pytest.raises(ValueError) as excinfo:
        GPTConfig(n_embd=50, n_head=3)
    message = str(excinfo.value)
    assert re.search(r'\b50\b', message) and re.search(r'\b3\b', message), message


def test_crop_block_size():
    """Cropping shrinks wpe; the cropped model runs at the new size and gives the same logits
    as the original on an input that fits both."""
    m = tiny()
    idx = random_idx(B=2, T=8)
    with torch.no_grad():
        before, _ = m(idx, torch.zeros_like(idx))
    original_wpe = m.transformer.wpe.weight.detach().clone()
    m.crop_block_size(8)
    assert m.config.block_size == 8
    assert m.transformer.wpe.weight.shape == (8, 32)
    assert torch.equal(m.transformer.wpe.weight, original_wpe[:8])
    with torch.no_grad():
        after, _ = m(idx, torch.zeros_like(idx))
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        m(random_idx(B=1, T=9))
    out = m.generate(idx, max_new_tokens=3, temperature=0)  # crops its context to 8
    assert out.shape == (2, 11)
    with pytest.raises(ValueError):
        m.crop_block_size(9)
