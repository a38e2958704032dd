"""
The GPT language model, in one file, with GPT-2's layout and parameter names.

References:
1) OpenAI's GPT-2 paper, "Language Models are Unsupervised Multitask Learners" (2019)
2) OpenAI's released TensorFlow code: https://github.com/openai/gpt-2/blob/master/src/model.py
3) "Attention Is All You Need" (Vaswani et al., 2017) for the attention itself

The model and nothing else: it imports no other file of this project. With every switch of
GPTConfig at its default it is GPT-2; the switches give the Llama family's computations (rotary
positions, RMSNorm, SwiGLU, grouped-query attention, QK-norm): hf_models.py loads Llama and Qwen3.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the model sees, in tokens
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # dropout probability; 0.0 for pretraining, 0.1+ for finetuning
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2; False is a bit faster
    flash: bool = True  # True: PyTorch's fused attention; False: the attention written out
    gelu: str = 'exact'  # 'exact' | 'tanh': the approximation GPT-2 was trained with
    # later architecture changes, all off by default (GPT-2 exactly), each cited where it is used
    rope: bool = False  # rotary position embeddings (RoFormer) instead of learned ones: no wpe
    rmsnorm: bool = False  # RMSNorm instead of LayerNorm: no mean subtraction, no bias
    swiglu: bool = False  # SwiGLU MLP instead of GELU, at about the same parameter count
    n_kv_head: int = 0  # key/value heads (grouped-query attention): 0 = n_head, 1 = multi-query
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before their dot product
    # what the Llama family's published models set, with GPT-2's values as the defaults
    head_dim: int = 0  # each head's width: 0 = n_embd // n_head (Qwen3-0.6B: 128, n_embd 1024)
    mlp_hidden: int = 0  # the MLP's hidden width: 0 = 4 * n_embd (SwiGLU: about 8/3 * n_embd)
    rope_theta: float = 10000.0  # rotary base: RoFormer's 10000; Qwen3 1e6, SmolLM2 1e5
    norm_eps: float = 1e-5  # added to the variance in LayerNorm / RMSNorm (Qwen3: 1e-6)
    tie_embeddings: bool = True  # lm_head is wte itself (GPT-2); False: its own weights

    def __post_init__(self):
        for name in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, not {getattr(self, name)}")
        if not self.head_dim and self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}: "
                             f"choose n_embd as a multiple of n_head (for example "
                             f"{self.n_head * 64})")
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            divisors = [d for d in range(1, self.n_head + 1) if self.n_head % d == 0]
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head "
                             f"{self.n_kv_head}: choose n_kv_head among {divisors} (query heads "
                             f"share key/value heads in equal groups), or 0 for n_head")
        if self.rope and self.head_size % 2:
            raise ValueError(f"rope rotates pairs of dimensions, but the head size (n_embd / "
                             f"n_head or head_dim) = {self.head_size} is odd: choose an even one")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.gelu not in ('exact', 'tanh'):
            raise ValueError(f"gelu must be 'exact' or 'tanh', not '{self.gelu}'")

    @property
    def head_size(self):
        return self.head_dim or self.n_embd // self.n_head

    @property
    def hidden_size(self):
        """The MLP's hidden width. SwiGLU (Shazeer 2020) has three matrices instead of two, so
        2/3 of 4C keeps the GELU MLP's 8C^2 weights; rounded to a multiple of 64 (fast matmuls)."""
        if self.mlp_hidden:
            return self.mlp_hidden
        return 64 * max(1, round(8 * self.n_embd / 3 / 64)) if self.swiglu else 4 * self.n_embd


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's own has no bias=False before 2.1)."""

    def __init__(self, ndim, bias, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / rms(x) * gain, without LayerNorm's mean and bias; as
    good and cheaper (Llama's choice). Computed in float32, returned in x's dtype (bf16 under
    autocast)."""

    def __init__(self, ndim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))  # the gain
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).type_as(x)


def make_norm(config, ndim=None):
    """GPT-2's LayerNorm, or RMSNorm, over ndim features (default n_embd)."""
    ndim = ndim or config.n_embd
    if config.rmsnorm:
        return RMSNorm(ndim, config.norm_eps)
    return LayerNorm(ndim, bias=config.bias, eps=config.norm_eps)


def rotary(pos, hs, theta=10000.0):
    """The angles of rotary position embeddings (RoPE; Su et al. 2021, RoFormer, theta = 10000):
    at position p, dimension pair i of a head turns by p * theta^(-2i/hs), the first pairs fast, the
    last slowly. pos (T,) are absolute positions; returns (cos, sin), each (T, hs/2)."""
    inv_freq = theta ** (-torch.arange(0, hs, 2, dtype=torch.float32, device=pos.device) / hs)
    angles = pos.float()[:, None] * inv_freq[None, :]  # (T, 1) * (1, hs/2) -> (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate each pair (x[..., i], x[..., i + hs/2]) of x (B, nh, T, hs) by its angle: q.k then
    depends on p - p' only. (The paper pairs neighbouring dimensions; halves, as GPT-NeoX and
    Llama's Hugging Face ports do, are a fixed permutation of them, which the weights absorb.)"""
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, nh, T, hs/2)
    # (B, nh, T, hs/2) each, side by side -> (B, nh, T, hs)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        hs = config.head_size
        # grouped-query attention (GQA; Ainslie et al. 2023): n_kv_head key/value heads, each shared
        # by a group of n_head / n_kv_head query heads; c_attn and the KV cache shrink
        self.n_kv_head = config.n_kv_head or config.n_head
        # query, key and value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * self.n_kv_head) * hs,
                                bias=config.bias)
        # QK-norm (Dehghani et al. 2023, ViT-22B; Wortsman et al. 2023): unit-RMS queries and keys
        # keep the attention logits bounded, so training stays stable at high learning rates
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(hs, config.norm_eps), RMSNorm(hs, config.norm_eps)
        # output projection back into the residual stream
        self.c_proj = nn.Linear(config.n_head * hs, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.head_size = hs
        self.dropout = config.dropout
        self.flash = config.flash

    def forward(self, x, kv_cache=None, rope=None):
        """rope: None, or the (cos, sin) of rotary() at the positions of x's tokens."""
        B, T, C = x.size()  # batch size, sequence length, embedding width (n_embd)
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size  # heads, key/value heads, width

        # project to q, k, v and move the head dimension forward: one attention per head
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # each head's vector to RMS 1, times a gain
        if rope is not None:  # positions enter here, as rotations; the cache keeps keys rotated
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv_cache is not None:
            # generating: x holds only the new tokens; their keys and values join those of the
            # earlier tokens, kept from previous calls, and the new queries attend to all of them
            k, v = kv_cache.append(k, v)  # (B, nkv, Tk, hs), Tk = tokens cached before + T
        Tk = k.size(2)  # keys each query may look at: T without a cache
        if nkv != nh:  # GQA: query head h reads key/value head h // (nh / nkv)
            k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nkv, Tk, hs) -> (B, nh, Tk, hs)
            v = v.repeat_interleave(nh // nkv, dim=1)  # (B, nkv, Tk, hs) -> (B, nh, Tk, hs)
        # query i is token Tk - T + i of the text: it sees the keys up to its own, none later
        causal = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(Tk - T)  # (T, Tk)

        if self.flash:
            # PyTorch's fused kernel (FlashAttention on recent GPUs) computes what the branch below
            # writes out, without materialising the scores; is_causal is its mask when Tk == T
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if Tk == T else causal,
                                               is_causal=Tk == T,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            # the attention written out, to read and to step through in a debugger
            # (B, nh, T, hs) @ (B, nh, hs, Tk) -> (B, nh, T, Tk): how much query i matches key j
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
            att = att.masked_fill(~causal, float('-inf'))  # (B, nh, T, Tk): later keys get 0 weight
            att = F.softmax(att, dim=-1)  # (B, nh, T, Tk): each row sums to 1
            att = self.attn_dropout(att)  # (B, nh, T, Tk)
            y = att @ v  # (B, nh, T, Tk) @ (B, nh, Tk, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, nh*hs): heads side by side

        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class KVCache:
    """The keys and values one attention layer has computed for the tokens so far: a new token
    needs one position's forward, not the whole context's (GPT.generate). Grown by torch.cat."""

    def __init__(self):
        self.k = None  # (B, nkv, tokens so far, hs)
        self.v = None  # (B, nkv, tokens so far, hs)

    def __len__(self):
        return 0 if self.k is None else self.k.size(2)

    def append(self, k, v):
        """Add the keys and values (B, nkv, T, hs) of T new tokens; return all of them so far."""
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)  # (B, nkv, len + T, hs)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)  # (B, nkv, len + T, hs)
        return self.k, self.v


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        C, hidden, self.swiglu = config.n_embd, config.hidden_size, config.swiglu
        # SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): silu(x W) * (x V), then
        # c_proj; W and V side by side in c_fc
        self.c_fc = nn.Linear(C, 2 * hidden if config.swiglu else hidden, bias=config.bias)
        # exact, or GPT-2's tanh approximation: they differ by up to ~1e-3, enough to change GPT-2
        self.gelu = nn.GELU(approximate='tanh' if config.gelu == 'tanh' else 'none')
        self.c_proj = nn.Linear(hidden, C, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)  # (B, T, hidden); SwiGLU: (B, T, 2 * hidden)
        if self.swiglu:
            gate, x = x.chunk(2, dim=-1)  # 2 x (B, T, hidden)
            x = F.silu(gate) * x  # (B, T, hidden)
        else:
            x = self.gelu(x)  # (B, T, hidden)
        x = self.c_proj(x)  # (B, T, C)
        return self.dropout(x)


class Block(nn.Module):
    """One transformer block: pre-norm residual attention, then a pre-norm residual MLP."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, rope=None):
        x = x + self.attn(self.ln_1(x), kv_cache, rope)  # tokens exchange information
        x = x + self.mlp(self.ln_2(x))  # each token computes on its own
        return x


def check_generate_args(max_new_tokens, temperature, top_k):
    """What generate() can do, as a ValueError naming the setting otherwise."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), not {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 keeps every token), not {top_k}")


class GPT(nn.Module):

    def __init__(self, config, init_weights=True):
        """init_weights=False skips GPT-2's random initialisation, for weights loaded next."""
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=None if config.rope else nn.Embedding(config.block_size, config.n_embd),  # learned
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # weight tying (Press & Wolf 2017, "Using the Output Embedding to Improve Language
            # Models"): the output projection is the token embedding matrix itself, as in GPT-2
            self.transformer.wte.weight = self.lm_head.weight

        if init_weights:
            # GPT-2's initialisation: normal(0, 0.02) for weights, zeros for biases ...
            self.apply(self._init_weights)
            # ... and the projections that write into the residual stream scaled by 1/sqrt(2 *
            # n_layer): each of the 2 * n_layer residual branches adds its variance (GPT-2, 2.3)
            for name, p in self.named_parameters():
                if name.endswith('c_proj.weight'):
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Number of parameters. By default the position embeddings are left out, as is usual when
        quoting model size; the token embeddings count because they are also lm_head (tied)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and self.transformer.wpe is not None:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, kv_cache=None, reduction='mean'):
        """kv_cache: None, or one KVCache per block holding the tokens before idx (generate).
        reduction: 'mean' over the targets that count, or their 'sum' (0 when none counts).
        Without targets only the last position's logits (B, 1, vocab_size) come back."""
        B, T = idx.size()  # batch size, sequence length
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size "
                             f"{self.config.block_size}")
        past = 0 if kv_cache is None else len(kv_cache[0])  # tokens cached: idx starts there
        if past + T > self.config.block_size:
            raise ValueError(f"{past} cached + {T} new tokens are more than block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)

        x = self.transformer.wte(idx)  # token embeddings (B, T, C)
        rope = None
        if self.config.rope:  # positions as rotations of queries and keys, in every block
            rope = rotary(pos, self.config.head_size, self.config.rope_theta)
        else:
            x = x + self.transformer.wpe(pos)  # position embeddings (T, C), broadcast over B
        x = self.transformer.drop(x)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if kv_cache is None else kv_cache[i], rope)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)

        if targets is not None:
            logits = self.lm_head(x)  # (B, T, vocab_size)
            # cross-entropy over every position, flattened to (B*T, vocab_size) and (B*T,);
            # a target of -1 is ignored
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1, reduction=reduction)
        else:
            # generating needs only the next token's logits: the last position's. The list
            # index [-1] keeps the time dimension: (B, 1, vocab_size)
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context length, e.g. to finetune GPT-2 (1024) at a smaller block size."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to "
                             f"{block_size}")
        self.config.block_size = block_size
        if self.transformer.wpe is not None:  # rotary positions are computed: nothing to crop
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @torch.no_grad()
    def grow_vocab(self, vocab_size, known):
        """Give ids known.. (new tokens: a chat template's markers, new characters) fresh rows in
        wte and lm_head, growing them to vocab_size rows if they have fewer. Each new row starts at
        the mean of the known rows, so a new token's logit starts near the average one, not at an
        outlier (Hewitt 2021, "Initializing new word embeddings for pretrained language models").
        Returns the number of rows added."""
        def grown(weight):  # (old vocab_size, C) -> (vocab_size, C)
            added = max(0, vocab_size - weight.size(0))
            rows = torch.cat([weight, weight.new_zeros(added, weight.size(1))])
            rows[known:] = weight[:known].mean(dim=0)
            return nn.Parameter(rows)

        added = max(0, vocab_size - self.config.vocab_size)
        self.transformer.wte.weight = grown(self.transformer.wte.weight)
        self.lm_head.weight = (self.transformer.wte.weight if self.config.tie_embeddings
                               else grown(self.lm_head.weight))  # tied: still one tensor
        self.config.vocab_size = self.transformer.wte.weight.size(0)
        self.transformer.wte.num_embeddings = self.lm_head.out_features = self.config.vocab_size
        return added

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, leave_out=(),
                             fused=True):
        """AdamW with decoupled weight decay on matrices (matmul weights, embeddings) only: biases
        and norm gains (1-D tensors) are not decayed. leave_out: parameters another optimizer
        updates (Muon takes the blocks' matrices: muon.py). fused: AdamW's one-kernel step where
        the device has it (CUDA, and the CPU since PyTorch 2.4). Each group's 'lr_scale' is its
        peak over learning_rate, for the schedule (train.py)."""
        left_out = {id(p) for p in leave_out}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in left_out]
        groups = [
            {'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay,
             'lr_scale': 1.0},
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0, 'lr_scale': 1.0},
        ]
        try:
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                     fused=fused and device_type in ('cuda', 'cpu'))
        except (RuntimeError, TypeError):  # an older PyTorch, without the CPU kernel (or any)
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's
        score and weighted-sum matmuls (PaLM paper, Chowdhery et al. 2022, appendix B)."""
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_size, cfg.block_size
        return 6 * N + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: FLOPs/s achieved over the device's peak (devices.peak_flops)."""
        return self.flops_per_token() * tokens_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_size=None,
                 use_cache=True, generator=None):
        """Extend idx (B, T) by max_new_tokens tokens, one at a time, each fed back in.
        temperature 0 is greedy; top_k keeps the k likeliest (None or 0: all); vocab_size keeps
        a padded vocabulary's padding ids (50257 to 50304) from being drawn. use_cache: each
        layer's keys and values kept (KVCache), the same tokens as a full forward at each step
        (False). generator: draw from it, not the global state. Call model.eval() first."""
        check_generate_args(max_new_tokens, temperature, top_k)
        block_size = self.config.block_size
        kv_cache = None
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= block_size:
                if kv_cache is None:  # first step: the whole prompt, filling the cache
                    kv_cache = [KVCache() for _ in self.transformer.h]
                    logits, _ = self(idx, kv_cache=kv_cache)
                else:  # then only the token drawn last: the earlier ones are in the cache
                    logits, _ = self(idx[:, -1:], kv_cache=kv_cache)
            else:
                # the model has positions for block_size tokens only: keep the most recent ones.
                # Past block_size each step moves every kept token to a new position, which
                # changes every key and value (the first layer's under learned positions, the
                # later layers' under RoPE too): nothing cached is reusable, so a full forward
                idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]
                logits, _ = self(idx_cond)
            logits = logits[:, -1, :]  # (B, vocab_size)
            if vocab_size is not None:
                logits[:, vocab_size:] = -float('inf')
            if temperature == 0:
                idx_next = torch.argmax(logits, dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k:  # None or 0: keep every token
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k), sorted
                    logits[logits < v[:, [-1]]] = -float('inf')
                probs = F.softmax(logits, dim=-1)  # (B, vocab_size)
                idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
        return idx
