"""
Tests of lora.py against peft (the independent reference: logits and the adapters' gradients, with
and without adapter dropout), against plain autograd on the base model (the new rows' gradients),
and against invariants: B = 0 and adapters_off give the base model exactly, a step moves only the
trained tensors, merging changes nothing the model computes and leaves a plain GPT's state_dict,
a checkpoint of the trained tensors round-trips, and bad arguments are one-line ValueErrors.
CPU, float32, seeded, tiny configs, one thread.
"""

import copy
import io

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

from lora import (add_lora, adapters_off, load_lora_state_dict, lora_state_dict, merge_lora, store_frozen,
                  train_new_rows)
from model import GPT, GPTConfig
from test_model import one_thread  # noqa: F401 (an autouse fixture: one torch thread)


TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0)
VARIANTS = [dict(), dict(bias=False), dict(swiglu=True), dict(bias=False, swiglu=True),
            dict(rope=True, rmsnorm=True, swiglu=True, qk_norm=True, n_kv_head=1, bias=False)]
IDS = ['gpt2', 'nobias', 'swiglu', 'nobias-swiglu', 'qwen3']
TARGETS = ['c_attn', 'c_proj', 'c_fc']
KNOWN = 45  # ids 45..49 play the new tokens


def tiny(untied=False, **overrides):
    """A seeded tiny GPT in eval mode; untied: lm_head gets its own copy of the embedding."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**dict(TINY, **overrides))).eval()
    if untied:
        m.lm_head.weight = nn.Parameter(m.lm_head.weight.detach().clone())
    return m


def batch(seed=1):
    """Inputs and targets (3, 16), every new token among the inputs."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, TINY['vocab_size'], (3, 16), generator=g)
    idx[0, :5] = torch.arange(KNOWN, TINY['vocab_size'])
    return idx, torch.randint(0, TINY['vocab_size'], (3, 16), generator=g)


def randomize(params, seed=2):
    """Give trained tensors random values, so that B A != 0 and new rows differ from the base's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.1, generator=g)


def ours_and_peft(overrides, dropout=0.0):
    """Our LoRA and peft's on copies of one tiny GPT, with the same A and the same random B."""
    base = tiny(**overrides)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    add_lora(ours, rank=4, alpha=8, dropout=dropout)
    get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                      target_modules=TARGETS))
    randomize([p for n, p in ours.named_parameters() if n.endswith('lora_B')])
    peft_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    ours_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(peft_params) == sorted(n + '.default.weight' for n in ours_params)  # same layers
    with torch.no_grad():
        for n, p in ours_params.items():
            peft_params[n + '.default.weight'].copy_(p)
    return base, ours, theirs, peft_params


def max_diff(a, b):
    return (a - b).abs().max().item()


# -----------------------------------------------------------------------------
# against peft


@pytest.mark.parametrize('overrides', VARIANTS, ids=IDS)
@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_logits_and_gradients_match_peft(overrides, dropout):
    """Same logits and the same A and B gradients as peft. With dropout > 0 in train mode both
    draw their masks from the same seed, in the same order and shapes, if both drop x itself."""
    base, ours, theirs, peft_params = ours_and_peft(overrides, dropout)
    idx, targets = batch()
    outputs = []
    for m in (ours, theirs, base):
        m.train(dropout > 0)
        torch.manual_seed(3)
        outputs.append(m(idx, targets))
    (logits, loss), (peft_logits, peft_loss), (base_logits, _) = outputs
    assert max_diff(logits, peft_logits) <= 1e-5
    assert max_diff(logits, base_logits) > 1e-2  # the adapters do change the logits
    loss.backward()
    peft_loss.backward()
    for n, p in ours.named_parameters():
        if p.requires_grad:
            reference = peft_params[n + '.default.weight'].grad
            assert reference.abs().max() > 1e-4, n  # a gradient worth comparing
            assert max_diff(p.grad, reference) <= 1e-5, n


# -----------------------------------------------------------------------------
# training touches the trained tensors only


@pytest.mark.parametrize('overrides', VARIANTS, ids=IDS)
def test_step_moves_adapters_only(overrides):
    """One AdamW step over add_lora's parameters: every base parameter bitwise the same, every
    adapter moved; the adapters are exactly the parameters that require a gradient."""
    m = tiny(**overrides)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    params = add_lora(m, rank=4, alpha=8)
    assert {id(p) for p in params} == {id(p) for p in m.parameters() if p.requires_grad}
    assert len(params) == 2 * 4 * TINY['n_layer']  # A and B of 4 Linear layers a block
    randomize(params[1::2])  # the Bs: with B = 0 no gradient reaches A
    adapters = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    m(*batch())[1].backward()
    opt.step()
    after = dict(m.named_parameters())
    for n, p in before.items():
        assert torch.equal(after[n], p) and after[n].grad is None, n
    for n, p in adapters.items():
        assert not torch.equal(after[n], p), n


@pytest.mark.parametrize('untied', [False, True], ids=['tied', 'untied'])
def test_new_rows_step(untied):
    """A step over adapters and new rows (weight decay on): embedding and lm_head rows < known
    bitwise the same, every row >= known moved; tied, wte and lm_head stay one table."""
    m = tiny(untied)
    wte, head = m.transformer.wte.weight.detach().clone(), m.lm_head.weight.detach().clone()
    params = add_lora(m, rank=4, alpha=8)
    rows = train_new_rows(m, KNOWN)
    assert len(rows) == (2 if untied else 1)
    params += rows
    assert {id(p) for p in params} == {id(p) for p in m.parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    m(*batch())[1].backward()
    opt.step()
    for old, new in ((wte, m.transformer.wte.weight), (head, m.lm_head.weight)):
        assert torch.equal(new[:KNOWN], old[:KNOWN])
        assert (new[KNOWN:] != old[KNOWN:]).any(dim=1).all()  # each new row moved
    assert torch.equal(m.transformer.wte.weight, m.lm_head.weight) != untied


@pytest.mark.parametrize('untied', [False, True], ids=['tied', 'untied'])
def test_new_rows_gradient_is_the_base_models(untied):
    """The new rows' gradient is the full embedding's gradient at those rows, in a plain model
    (tied: the sum over both uses, as autograd adds them for the one tensor). Alone, or before
    add_lora, train_new_rows leaves the rows the only trainable part of wte and lm_head."""
    base = tiny(untied)
    m = copy.deepcopy(base)
    rows = train_new_rows(m, KNOWN)
    tables = list(m.transformer.wte.parameters()) + list(m.lm_head.parameters())
    assert {id(p) for p in tables if p.requires_grad} == {id(p) for p in rows}
    later = copy.deepcopy(m)
    adapters = add_lora(later, rank=4, alpha=8)  # add_lora afterwards: the rows still train
    assert sum(p.requires_grad for p in later.parameters()) == len(adapters) + len(rows)
    base(*batch())[1].backward()
    m(*batch())[1].backward()
    full = [base.transformer.wte.weight.grad] + ([base.lm_head.weight.grad] if untied else [])
    for r, g in zip(rows, full):
        assert max_diff(r.grad, g[KNOWN:]) <= 1e-7


# -----------------------------------------------------------------------------
# the base model: at initialisation, and under adapters_off


def test_initialisation_is_peft_default():
    """B zeros; A as kaiming_uniform(a=sqrt(5)) draws it, uniform in +-1/sqrt(in_features) (its
    gain sqrt(2 / (1 + 5)) times sqrt(3 / in_features)), as peft's init_lora_weights=True does."""
    m = tiny()
    add_lora(m, rank=8, alpha=8)
    for layer in (m.transformer.h[0].attn.c_attn, m.transformer.h[1].mlp.c_proj):
        A, B = layer.lora_A, layer.lora_B
        assert A.shape == (8, layer.in_features) and B.shape == (layer.out_features, 8)
        assert torch.equal(B, torch.zeros_like(B))
        bound = layer.in_features ** -0.5
        assert 0.9 * bound < A.abs().max() <= bound
        assert abs(A.std() / (bound / 3 ** 0.5) - 1) < 0.15  # a uniform's std is bound / sqrt(3)


@pytest.mark.parametrize('overrides', VARIANTS, ids=IDS)
def test_initial_model_is_the_base(overrides):
    """B = 0 and new rows copied: the base model's logits exactly, adapter dropout on or off."""
    base = tiny(**overrides)
    m = copy.deepcopy(base)
    add_lora(m, rank=4, alpha=8, dropout=0.1)
    train_new_rows(m, KNOWN)
    idx, targets = batch()
    for train in (False, True):
        m.train(train)
        assert torch.equal(m(idx, targets)[0], base(idx, targets)[0])


@pytest.mark.parametrize('untied', [False, True], ids=['tied', 'untied'])
def test_adapters_off_is_the_base(untied):
    """After training adapters and new rows, adapters_off computes the base model exactly; after
    it the adapters are back."""
    base = tiny(untied)
    m = copy.deepcopy(base)
    params = add_lora(m, rank=4, alpha=8) + train_new_rows(m, KNOWN)
    randomize(params[1::2])
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        m(*batch())[1].backward()
        opt.step()
    idx, targets = batch(seed=4)
    tuned = m(idx, targets)[0]
    with adapters_off(m):
        assert torch.equal(m(idx, targets)[0], base(idx, targets)[0])
    assert torch.equal(m(idx, targets)[0], tuned)
    assert max_diff(tuned, base(idx, targets)[0]) > 1e-2


# -----------------------------------------------------------------------------
# merging and checkpoints


def trained(untied=False, **overrides):
    """A tiny GPT with LoRA and new rows, their tensors random (as after training); and its base."""
    base = tiny(untied, **overrides)
    m = copy.deepcopy(base)
    randomize(add_lora(m, rank=4, alpha=8) + train_new_rows(m, KNOWN))
    return m, base


@pytest.mark.parametrize('overrides', VARIANTS, ids=IDS)
@pytest.mark.parametrize('untied', [False, True], ids=['tied', 'untied'])
def test_merge(overrides, untied):
    """Merged: the same logits, a plain GPT's state_dict keys and module types, every parameter
    trainable; tied wte and lm_head still one tensor, untied two."""
    m, base = trained(untied, **overrides)
    idx, targets = batch()
    logits = m(idx, targets)[0]
    assert merge_lora(m) is m
    assert max_diff(m(idx, targets)[0], logits) <= 1e-5
    assert list(m.state_dict()) == list(GPT(GPTConfig(**dict(TINY, **overrides))).state_dict())
    assert list(m.state_dict()) == list(base.state_dict())
    assert {type(x) for x in m.modules() if isinstance(x, nn.Linear)} == {nn.Linear}
    assert type(m.transformer.wte) is nn.Embedding
    assert all(p.requires_grad for p in m.parameters())
    wte, head = m.transformer.wte.weight, m.lm_head.weight
    assert (head is wte and head.data_ptr() == wte.data_ptr()) != untied


@pytest.mark.parametrize('untied', [False, True], ids=['tied', 'untied'])
def test_lora_state_dict_round_trip(untied):
    """Only the trained tensors are saved; loaded into a fresh LoRA model of the same base
    (differently drawn A) they give the same logits exactly."""
    m, base = trained(untied)
    sd = lora_state_dict(m)
    assert sum(t.numel() for t in sd.values()) == sum(
        p.numel() for p in m.parameters() if p.requires_grad)
    assert len(sd) == 2 * 4 * TINY['n_layer'] + (2 if untied else 1)
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    fresh = copy.deepcopy(base)
    torch.manual_seed(7)
    add_lora(fresh, rank=4, alpha=8)
    train_new_rows(fresh, KNOWN)
    load_lora_state_dict(fresh, torch.load(buffer, weights_only=True))
    idx, targets = batch()
    assert torch.equal(fresh(idx, targets)[0], m(idx, targets)[0])


# -----------------------------------------------------------------------------
# what a user can get wrong


def raises_one_line(fn, *words):
    with pytest.raises(ValueError) as e:
        fn()
    message = str(e.value)
    assert '\n' not in message and all(w in message for w in words), message


def test_bad_arguments():
    m = tiny()
    raises_one_line(lambda: add_lora(m, 0, 8), 'rank')
    raises_one_line(lambda: add_lora(m, 4, 8, targets=['c_attn', 'q_proj']),
                    'q_proj', 'c_attn', 'c_proj', 'c_fc')
    raises_one_line(lambda: add_lora(nn.Sequential(nn.Linear(4, 4)), 4, 8), 'no nn.Linear')
    assert all(p.requires_grad for p in m.parameters())  # nothing frozen by a refused call
    add_lora(m, 4, 8)
    raises_one_line(lambda: add_lora(m, 4, 8), 'already', 'merge_lora')
    raises_one_line(lambda: train_new_rows(m, TINY['vocab_size']), 'known')
    sd = lora_state_dict(m)
    other = tiny()
    add_lora(other, 2, 8)  # another rank
    raises_one_line(lambda: load_lora_state_dict(other, sd), 'rank')
    train_new_rows(m, KNOWN)  # a name the state dict lacks
    raises_one_line(lambda: load_lora_state_dict(m, sd), 'rows', 'known')


def test_frozen_weights_stored_in_bfloat16_change_nothing_under_autocast():
    """store_frozen: the blocks' frozen matrices in bf16 give, under bf16 autocast, the logits and
    the adapters' gradients of the float32 model bit for bit (autocast casts them to bf16 anyway)."""
    grads, logits = [], []
    for half in (False, True):
        model = tiny()
        add_lora(model, 4, 8)
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, 'lora_B'):
                    m.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(m.lora_B.numel()))
        if half:
            store_frozen(model, torch.bfloat16)
            assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
        idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.autocast('cpu', torch.bfloat16):
            out, loss = model.train()(idx, idx)
        loss.backward()
        logits.append(out.float())
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert torch.equal(logits[0], logits[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
