"""
LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for model.py's GPT:
a chosen Linear keeps its frozen W and b and learns y = x W^T + b + (alpha / r) x A^T B^T, with
A (r, in), B (out, r), r small; B starts at zero, so training starts from the base model exactly.
Also: new vocabulary rows trained alone, merging back into a plain GPT, a checkpoint of the
trained tensors only, and the base model on demand (preference tuning's frozen reference).

    params = add_lora(model, rank=8, alpha=16, dropout=0.05)  # all else frozen
    params += train_new_rows(model, known=50257)  # e.g. chat markers appended to the vocabulary
    optimizer = torch.optim.AdamW(params, lr=1e-3)  # train; torch.save(lora_state_dict(model), f)
    with adapters_off(model): ref_logits, _ = model(idx, targets)  # the base model, no copy
    merge_lora(model)  # an ordinary GPT again, with its usual state_dict keys, e.g. for export
"""

import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

TARGETS = ('c_attn', 'c_proj', 'c_fc')  # a block's Linear layers (c_proj: attention's and MLP's)


class LoRALinear(nn.Linear):
    """nn.Linear's frozen weight and bias, under the same names, plus a trained low-rank update."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate and draw a weight to discard
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter('weight', base.weight)  # (out, in): the base's Parameter, no copy
        self.register_parameter('bias', base.bias)  # (out,), or None without biases
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, self.in_features))  # (r, in)
        self.lora_B = nn.Parameter(base.weight.new_zeros(self.out_features, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear(in, r) and peft do
        self.lora_dropout = nn.Dropout(dropout)  # on the adapter's input only, as the paper's code
        self.scale = alpha / rank  # so a new rank needs no new learning rate (paper, section 4.1)
        self.enabled = True  # False under adapters_off

    def forward(self, x):  # x: (..., in)
        y = F.linear(x, self.weight, self.bias)  # (..., out): the base layer
        if not self.enabled:
            return y
        h = self.lora_dropout(x) @ self.lora_A.t()  # (..., in) @ (in, r) -> (..., r)
        return y + self.scale * (h @ self.lora_B.t())  # (..., r) @ (r, out) -> (..., out)

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.lora_A.size(0)}, scale={self.scale}"

    @torch.no_grad()
    def merge(self):
        """A plain nn.Linear computing the same: weight W + scale * B A, the same bias."""
        bias = self.bias is not None
        linear = nn.Linear(self.in_features, self.out_features, bias, device='meta')  # no init
        delta = self.scale * (self.lora_B @ self.lora_A)  # (out, r) @ (r, in) -> (out, in)
        linear.weight = nn.Parameter(self.weight + delta)  # (out, in), a new tensor: W untouched
        linear.bias = self.bias  # (out,) or None
        return linear


class NewRows(nn.Module):
    """A parametrization of a (vocab_size, C) weight: rows < known are the frozen original's,
    the others this module's own trainable copy of them."""

    def __init__(self, weight, known):
        super().__init__()
        self.known, self.enabled = known, True  # enabled: False under adapters_off
        self.rows = nn.Parameter(weight[known:].detach().clone())  # (vocab_size - known, C)

    def forward(self, weight):  # weight: the frozen original (vocab_size, C)
        if not self.enabled:
            return weight  # the base model's own rows
        return torch.cat([weight[:self.known], self.rows])  # (known + new, C) = (vocab_size, C)


def add_lora(model, rank, alpha, dropout=0.0, targets=TARGETS):
    """Freeze every parameter of model and wrap each Linear named in targets in a LoRALinear.
    Returns the adapters' parameters: the only ones an optimizer should get."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if rank < 1:
        raise ValueError(f"rank must be a positive integer, not {rank}")
    if not targets or any(t not in TARGETS for t in targets):
        raise ValueError(f"targets {targets} must be a non-empty subset of {TARGETS}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA adapters: merge_lora(model) first, or keep them")
    linears = {name.split('.')[-1] for name, m in model.named_modules() if type(m) is nn.Linear}
    if not linears & set(targets):
        raise ValueError(f"model has no nn.Linear named in {targets}: add_lora expects a GPT")
    rows = _added(model)  # new rows, if train_new_rows came first: they stay trainable
    for name, p in model.named_parameters():  # the base: weights, biases, norms, embeddings
        p.requires_grad_(name in rows)
    for parent in list(model.modules()):  # lists first: the loops replace modules
        for name, child in list(parent.named_children()):
            if name in targets and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


def adapt(model, base, rank, alpha, dropout, targets, known):
    """add_lora, and train_new_rows where the vocabulary grew past known (the ids the base model
    learned); returns what a checkpoint keeps to build the same again: the base it names (base:
    init_from), the settings, and the base's fingerprint."""
    targets = targets.split(',') if isinstance(targets, str) else list(targets)
    base = os.path.abspath(base) if os.path.exists(base) else base  # a file, a folder, 'gpt2'
    lora = dict(base=base, rank=rank, alpha=alpha, dropout=dropout, targets=targets, known=known,
                fingerprint=fingerprint(model))
    add_lora(model, rank, alpha, dropout, targets)
    if known < model.config.vocab_size:
        train_new_rows(model, known)
    return lora


def store_frozen(model, dtype):
    """Keep the blocks' frozen matrices (and their biases) in dtype, the precision autocast runs
    their matmuls in (bfloat16 or float16): the same numbers reach the matmuls, with half the
    memory and no per-step copies. Only under autocast: a float32 matmul needs float32 weights."""
    for module in model.transformer.h.modules():
        if isinstance(module, nn.Linear):  # LoRALinear's too: its weight, not its adapters
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)


def fingerprint(model):
    """One number that changes with any weight: a LoRA checkpoint keeps its base's, to check it."""
    weights = [p.double() for p in model.parameters()]
    return sum(w.sum().item() + w.abs().sum().item() for w in weights)


def train_new_rows(model, known):
    """Make embedding rows known..vocab_size-1 trainable (tokens the base never learned), rows
    < known frozen and out of the optimizer; lm_head's too, one set for both if they are tied.
    Returns the new parameters (one tensor when tied, two when not)."""
    wte, head = model.transformer.wte, model.lm_head
    if not 0 <= known < wte.num_embeddings:  # at least one new row
        raise ValueError(f"known, the first new token id, must be in [0, {wte.num_embeddings - 1}] "
                         f"(below vocab_size), not {known}")
    if parametrize.is_parametrized(wte, 'weight'):
        raise ValueError("model already trains new rows: merge_lora(model) first, or keep them")
    # A parametrization, not a wrapper module: wte.weight and lm_head.weight stay the weights in
    # use, for any code that reads them; and a mask on the gradient would leave rows < known in
    # the optimizer, moved by weight decay
    tied = head.weight is wte.weight
    new = NewRows(wte.weight, known)
    wte.weight.requires_grad_(False)  # the original (vocab_size, C); rows >= known unused now
    parametrize.register_parametrization(wte, 'weight', new)
    head.weight.requires_grad_(False)
    # tied: the same NewRows on the same original, so both read one set of new rows
    head_rows = new if tied else NewRows(head.weight, known)
    parametrize.register_parametrization(head, 'weight', head_rows)
    return [new.rows] if tied else [new.rows, head_rows.rows]


def merge_lora(model):
    """Fold every adapter and trained new row into plain nn.Linear / nn.Embedding weights, tied
    again where they were: an ordinary GPT, every parameter trainable. Returns model."""
    for parent in list(model.modules()):  # lists first: the loops replace modules
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merge())
    for module in (model.transformer.wte, model.lm_head):
        if parametrize.is_parametrized(module, 'weight'):
            # sets the original Parameter to the parametrized value in place: tied stays tied
            parametrize.remove_parametrizations(module, 'weight', leave_parametrized=True)
    return model.requires_grad_(True)


def _added(model):
    """{name: Parameter} of every adapter and set of new rows, each once (tied: by first name)."""
    added = [(m.lora_A, m.lora_B) if isinstance(m, LoRALinear) else (m.rows,)
             for m in model.modules() if isinstance(m, (LoRALinear, NewRows))]
    ids = {id(p) for group in added for p in group}
    return {name: p for name, p in model.named_parameters() if id(p) in ids}


def is_lora(model):
    """Whether model has adapters or trained new rows."""
    return any(isinstance(m, (LoRALinear, NewRows)) for m in model.modules())


def lora_state_dict(model):
    """The trained tensors only (adapters, new rows), by name: what a LoRA checkpoint stores."""
    return {name: p.detach() for name, p in _added(model).items()}


@torch.no_grad()
def load_lora_state_dict(model, sd):
    """Load lora_state_dict's tensors into a model given the same add_lora and train_new_rows."""
    params = _added(model)
    ours = {(name, tuple(p.shape)) for name, p in params.items()}
    theirs = {(name, tuple(t.shape)) for name, t in sd.items()}
    if ours != theirs:
        diff = sorted(ours ^ theirs)[:2]  # a few (name, shape) that one side has and the other not
        raise ValueError(f"LoRA state dict does not match the model at {diff}: use the add_lora "
                         "rank and targets, and train_new_rows known, that it was saved with")
    for name, p in params.items():
        p.copy_(sd[name])


@contextmanager
def adapters_off(model):
    """Inside, model computes the base model exactly: adapters and new rows are skipped."""
    switches = [m for m in model.modules() if isinstance(m, (LoRALinear, NewRows))]
    before = [m.enabled for m in switches]
    for m in switches:
        m.enabled = False
    try:
        yield model
    finally:
        for m, on in zip(switches, before):
            m.enabled = on
