"""
The GPT language model, in one file, with GPT-2's layout and parameter names.

References:
1) OpenAI's GPT-2 paper, "Language Models are Unsupervised Multitask Learners" (2019)
2) OpenAI's released TensorFlow code: https://github.com/openai/gpt-2/blob/master/src/model.py
3) "Attention Is All You Need" (Vaswani et al., 2017) for the attention itself

The model and nothing else: GPTConfig, the layers (with both the fused and the written-out masked
attention), and GPT (initialisation, forward, generate, optimizer groups, FLOPs). It imports no other
file of this project and importing it only defines things. Files (checkpoints, GPT-2's Hugging Face
weights) are checkpoint.py's, devices, precision and the memory a step needs devices.py's, tokenizers
tokenizer.py's, the Muon optimizer muon.py's.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the model sees, in tokens (learned positions)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # width of the residual stream; must be divisible by n_head
    dropout: float = 0.0  # dropout probability; 0.0 for pretraining, 0.1+ for finetuning
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2; False is a bit better and faster
    flash: bool = True  # True: PyTorch's fused attention; False: the manual masked attention, written out
    gelu: str = 'exact'  # 'exact' | 'tanh': the approximation GPT-2 was trained with (from_pretrained sets it)
    # later architecture changes, all off by default (GPT-2 exactly), each cited where it is computed
    rope: bool = False  # rotary position embeddings (RoFormer) in attention instead of learned positions: no wpe
    rmsnorm: bool = False  # RMSNorm instead of LayerNorm: no mean subtraction, no bias
    swiglu: bool = False  # SwiGLU MLP instead of GELU, at about the same parameter count
    n_kv_head: int = 0  # key/value heads (grouped-query attention): 0 = n_head (plain), 1 = multi-query
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before their dot product

    def __post_init__(self):
        for name in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, not {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}: "
                             f"choose n_embd as a multiple of n_head (for example {self.n_head * 64})")
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            divisors = [d for d in range(1, self.n_head + 1) if self.n_head % d == 0]
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}: choose n_kv_head "
                             f"among {divisors} (query heads share key/value heads in equal groups), or 0 for n_head")
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope rotates pairs of dimensions, but the head size n_embd / n_head = "
                             f"{self.n_embd // self.n_head} is odd: choose an even one")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.gelu not in ('exact', 'tanh'):
            raise ValueError(f"gelu must be 'exact' or 'tanh', not '{self.gelu}'")


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's own has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / rms(x) * gain, without LayerNorm's mean and bias; as good and
    cheaper (Llama's choice). Computed in float32 and returned in x's dtype: under bf16 autocast x arrives
    in bf16, and PyTorch's fused kernel wants x and the gain in one dtype (else a warning and a slow path)."""

    def __init__(self, ndim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))  # the gain

    def forward(self, x):
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), 1e-5).type_as(x)


def make_norm(config):
    """GPT-2's LayerNorm, or RMSNorm."""
    return RMSNorm(config.n_embd) if config.rmsnorm else LayerNorm(config.n_embd, bias=config.bias)


def rotary(pos, hs, theta=10000.0):
    """The angles of rotary position embeddings (RoPE; Su et al. 2021, RoFormer, with its theta = 10000):
    at position p, dimension pair i of a head turns by p * theta^(-2i/hs), the first pairs fast, the last
    slowly. pos (T,) are absolute positions; returns (cos, sin), each (T, hs/2)."""
    inv_freq = theta ** (-torch.arange(0, hs, 2, dtype=torch.float32, device=pos.device) / hs)  # (hs/2,)
    angles = pos.float()[:, None] * inv_freq[None, :]  # (T, 1) * (1, hs/2) -> (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate each pair (x[..., i], x[..., i + hs/2]) of x (B, nh, T, hs) by its angle. A rotation by p*w
    of q and by p'*w of k leaves q.k depending on p - p' only: attention sees relative positions. (The
    paper pairs neighbouring dimensions; halves, as GPT-NeoX and Llama's ports do, differ only by a fixed
    permutation of the dimensions, which the learned weights absorb.)"""
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, nh, T, hs/2)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        hs = config.n_embd // config.n_head  # head size
        # grouped-query attention (GQA; Ainslie et al. 2023): n_kv_head key/value heads, each shared by a group
        # of n_head / n_kv_head query heads; c_attn and the KV cache shrink, quality barely moves
        self.n_kv_head = config.n_kv_head or config.n_head
        # query, key and value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * self.n_kv_head) * hs, bias=config.bias)
        # QK-norm (Dehghani et al. 2023, ViT-22B; Wortsman et al. 2023): unit-RMS queries and keys keep the
        # attention logits bounded, so training stays stable at high learning rates (RMSNorm over each head)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(hs), RMSNorm(hs)
        # output projection back into the residual stream
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.flash = config.flash

    def forward(self, x, kv_cache=None, rope=None, last_only=False):
        """rope: None, or the (cos, sin) of rotary() at the positions of x's tokens. last_only: the output
        of the last position only (B, 1, C), whose query still reads every position's key and value."""
        B, T, C = x.size()  # batch size, sequence length, embedding width (n_embd)
        hs, nkv = C // self.n_head, self.n_kv_head  # head size; key/value heads (n_head without GQA)

        # project to q, k, v and move the head dimension forward: one attention per head
        q, k, v = self.c_attn(x).split([C, nkv * hs, nkv * hs], dim=2)  # (B, T, C), 2 x (B, T, nkv * hs)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # each head's vector to RMS 1, times a learned gain
        if rope is not None:  # positions enter here, as rotations; the cache keeps keys already rotated
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv_cache is not None:
            # generating: x holds only the new tokens; their keys and values join those of the
            # earlier tokens, kept from previous calls, and the new queries attend to all of them
            k, v = kv_cache.append(k, v)  # (B, nkv, Tk, hs), Tk = tokens cached before + T
        if last_only:  # the keys and values of every position, the query of the last; from here on T = 1 query
            q, T = q[:, :, -1:], 1  # (B, nh, 1, hs)
        Tk = k.size(2)  # keys each query may look at: T without a cache
        if nkv != self.n_head:  # GQA: query head h reads key/value head h // (n_head / nkv)
            k = k.repeat_interleave(self.n_head // nkv, dim=1)  # (B, nkv, Tk, hs) -> (B, nh, Tk, hs)
            v = v.repeat_interleave(self.n_head // nkv, dim=1)  # (B, nkv, Tk, hs) -> (B, nh, Tk, hs)

        dropout = self.dropout if self.training else 0.0
        if self.flash and (Tk == T or T == 1):
            # one fused kernel (FlashAttention on recent GPUs); never materialises the T x T scores. Its
            # is_causal mask is aligned top-left (query 0 sees key 0 only): right without a cache; a single
            # query, the last token, sees every key. On the CPU under bfloat16 autocast its backward is 5x
            # slower than in float32 (torch 2.13, 7.3 vs 1.4 ms a call at 4 x 128, block 64): there
            # flash=False trains faster (bench.py)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=T > 1, dropout_p=dropout)
        else:
            # query i is token Tk - T + i of the sequence and sees the keys up to that one: the causal mask is a
            # bias, -inf on the later keys (a weight of 0 after the softmax) and 0 elsewhere, added to the scores
            mask = torch.full((T, Tk), float('-inf'), dtype=q.dtype, device=x.device)
            mask = mask.triu(diagonal=Tk - T + 1)  # (T, Tk): -inf above the shifted diagonal, 0 on and below it
            if self.flash:  # after a cache: the fused kernel, with that mask
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
            else:
                # the same computation written out, to read and to step through in a debugger:
                # att = q @ k.transpose(-2, -1) / sqrt(hs) + mask, as one op: baddbmm(mask, a, b, alpha) is mask
                # + alpha * (a @ b) for each of the B * nh heads; a step of nanoGPT's CPU command 4-7 % faster
                # than a matmul, a scaling and a masked_fill (bf16, 2 cores, one process side by side)
                att = torch.baddbmm(mask, q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2),
                                    alpha=1.0 / math.sqrt(hs))  # (B*nh, T, hs) @ (B*nh, hs, Tk) -> (B*nh, T, Tk)
                att = att.view(B, self.n_head, T, Tk)  # (B, nh, T, Tk)
                att = F.softmax(att, dim=-1)  # (B, nh, T, Tk), each row sums to 1
                att = self.attn_dropout(att)
                y = att @ v  # (B, nh, T, Tk) @ (B, nh, Tk, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh, hs) -> (B, T, C): heads side by side

        return self.resid_dropout(self.c_proj(y))


class KVCache:
    """The keys and values one attention layer has computed for the tokens generated so far.
    A new token then needs one position's forward plus attention over these, instead of a
    forward over the whole context (GPT.generate). The tensors grow by torch.cat: no batch size,
    dtype (bfloat16 under autocast) or device to know in advance. The copy is 5-17% of a baby-GPT
    step in torch.profiler (2 or 1 threads), yet a preallocated block_size buffer written in place,
    with a fill index to track, measured no faster end to end (144 vs 148 tokens/s, one thread)."""

    def __init__(self):
        self.k = None  # (B, nh, tokens so far, hs); nh is n_kv_head with grouped-query attention
        self.v = None  # (B, nh, tokens so far, hs)

    def __len__(self):
        return 0 if self.k is None else self.k.size(2)

    def append(self, k, v):
        """Add the keys and values (B, nh, T, hs) of T new tokens; return all of them so far."""
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)  # (B, nh, len + T, hs)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)  # (B, nh, len + T, hs)
        return self.k, self.v


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        C, self.swiglu = config.n_embd, config.swiglu
        # SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): silu(x W) * (x V), then c_proj. Three
        # matrices instead of two, so a hidden width of 2/3 * 4C keeps the GELU MLP's 8C^2 weights; rounded
        # to the nearest multiple of 64 for fast matmuls: C = 128 -> 320 (7.5C^2), 384 -> 1024 (8C^2 exactly)
        hidden = 64 * max(1, round(8 * C / 3 / 64)) if config.swiglu else 4 * C
        self.c_fc = nn.Linear(C, 2 * hidden if config.swiglu else hidden, bias=config.bias)  # SwiGLU: W, V side by side
        # exact, or GPT-2's tanh approximation: they differ by up to ~1e-3, enough to change GPT-2's logits
        self.gelu = nn.GELU(approximate='tanh' if config.gelu == 'tanh' else 'none')
        self.c_proj = nn.Linear(hidden, C, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)  # (B, T, 4C); SwiGLU: (B, T, 2 * hidden)
        if self.swiglu:
            gate, x = x.chunk(2, dim=-1)  # 2 x (B, T, hidden)
            x = F.silu(gate) * x  # (B, T, hidden)
        else:
            x = self.gelu(x)
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

    def forward(self, x, kv_cache=None, rope=None, last_only=False):
        """last_only: only the last position's output (B, 1, C), for generating (GPT.forward)."""
        # tokens exchange information; with last_only, the last token reads every token's key and value
        x = (x[:, -1:] if last_only else x) + self.attn(self.ln_1(x), kv_cache, rope, last_only)
        x = x + self.mlp(self.ln_2(x))  # each token computes on its own
        return x


def check_generate_args(max_new_tokens, temperature, top_k):
    """What generate() can do, as a ValueError naming the setting otherwise (sample.py and chat.py check first)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), not {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 keeps every token), not {top_k}")


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=None if config.rope else nn.Embedding(config.block_size, config.n_embd),  # learned positions
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017, "Using the Output Embedding to Improve Language Models"):
        # the output projection is the token embedding matrix itself, as in GPT-2. One tensor, two uses.
        self.transformer.wte.weight = self.lm_head.weight

        # GPT-2's initialisation: normal(0, 0.02) for weights, zeros for biases ...
        self.apply(self._init_weights)
        # ... and the projections that write into the residual stream scaled by 1/sqrt(2 * n_layer),
        # since each of the 2 * n_layer residual branches adds its variance to the stream (GPT-2 paper, 2.3)
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
        """Number of parameters. By default the position embeddings are left out, as is usual
        when quoting model size; the token embeddings count because they are also lm_head. (RoPE has none.)"""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and self.transformer.wpe is not None:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, kv_cache=None, reduction='mean'):
        """kv_cache: None, or one KVCache per block holding the tokens before idx (generate).
        reduction: 'mean' over the targets that count, or their 'sum' (0, not NaN, when none counts).
        Without targets only the last position's logits (B, 1, vocab_size) come back, and the last block
        computes that position only (a hook on it sees (B, 1, C))."""
        B, T = idx.size()  # batch size, sequence length
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        past = 0 if kv_cache is None else len(kv_cache[0])  # tokens already cached: idx starts at this position
        if past + T > self.config.block_size:
            raise ValueError(f"{past} cached + {T} new tokens are more than block_size {self.config.block_size}")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)

        x = self.transformer.wte(idx)  # token embeddings (B, T, C)
        rope = rotary(pos, self.config.n_embd // self.config.n_head) if self.config.rope else None
        if rope is None:
            x = x + self.transformer.wpe(pos)  # position embeddings (T, C), broadcast over the batch
        x = self.transformer.drop(x)  # (B, T, C)
        # generating needs the next token only, so the last block computes the last position only (its keys and
        # values still all): a baby GPT's 256-token forward, bf16 on 2 CPU cores, 10.0 -> 9.0 ms, the same logits
        for i, block in enumerate(self.transformer.h):
            last_only = targets is None and i == len(self.transformer.h) - 1
            x = block(x, None if kv_cache is None else kv_cache[i], rope, last_only=last_only)
        x = self.transformer.ln_f(x)  # (B, T, C), or (B, 1, C) without targets
        logits = self.lm_head(x)  # (B, T, vocab_size), or (B, 1, vocab_size): the next token's only

        if targets is not None:
            # mean cross-entropy over every position, flattened to (B*T, vocab_size) and (B*T,);
            # a target of -1 is ignored
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                                   reduction=reduction)
        else:
            loss = None
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context length, e.g. to finetune GPT-2 (1024) at a smaller block size."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to {block_size}")
        self.config.block_size = block_size
        if self.transformer.wpe is not None:  # rotary positions are computed, not stored: nothing to crop
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @torch.no_grad()
    def grow_vocab(self, vocab_size, known):
        """Give ids known.. (new tokens: a chat template's markers, new characters) fresh embeddings, growing wte
        (and lm_head, the same tensor) to vocab_size rows if it has fewer. Each new row starts at the mean of the
        known rows, so a new token's logit starts near the average one, not at an outlier that a random or
        trained-down padding row would be (Hewitt 2021, "Initializing new word embeddings for pretrained
        language models"). Returns the number of rows added."""
        wte = self.transformer.wte.weight  # (old vocab_size, C)
        added = max(0, vocab_size - wte.size(0))
        rows = torch.cat([wte, wte.new_zeros(added, wte.size(1))]) if added else wte.clone()  # (vocab_size, C)
        rows[known:] = wte[:known].mean(dim=0)
        self.transformer.wte.weight = self.lm_head.weight = nn.Parameter(rows)  # still tied: one tensor
        self.transformer.wte.num_embeddings = self.lm_head.out_features = self.config.vocab_size = rows.size(0)
        return added

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, leave_out=()):
        """AdamW with decoupled weight decay on matrices (matmul weights, embeddings) only: biases and
        LayerNorm gains (1-D tensors) are not decayed. leave_out: parameters another optimizer updates (Muon
        takes the blocks' matrices: muon.py). Each group's 'lr_scale' is its peak over learning_rate, for the
        schedule (train.py)."""
        left_out = {id(p) for p in leave_out}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in left_out]  # tied: once
        groups = [
            {'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay, 'lr_scale': 1.0},
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0, 'lr_scale': 1.0},
        ]
        # AdamW's fused kernel updates every tensor in one pass, instead of a handful of ops per tensor:
        # on 2 CPU cores 1.3 ms instead of 8 ms a step for nanoGPT's CPU shape (CUDA: PyTorch >= 2.0, CPU: >= 2.4)
        try:
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ('cuda', 'cpu'))
        except (RuntimeError, TypeError):  # an older PyTorch, without the CPU kernel (or any)
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's
        score and weighted-sum matmuls (PaLM paper, Chowdhery et al. 2022, appendix B)."""
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * N + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: FLOPs/s achieved over the device's peak (devices.peak_flops gives it)."""
        return self.flops_per_token() * tokens_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_size=None, use_cache=True):
        """Extend idx (B, T) by max_new_tokens tokens, one at a time, each fed back in.
        temperature 0 picks the most likely token (greedy); top_k keeps only the k likeliest
        (None or 0 keeps all); vocab_size, when the model's vocabulary was padded (train.py pads
        50257 to 50304), keeps the padding ids, which no tokenizer can decode, from being drawn.
        use_cache=True keeps each layer's keys and values (KVCache), so a new token costs one
        position's forward; False runs the whole context through forward at every step, the
        plain reference. Both give the same tokens (test_model.py checks their logits agree).
        Call model.eval() first, or dropout stays on."""
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
                # Past block_size every step moves each kept token to a new position (the window
                # slides), and with learned absolute positions (wpe) all keys and values change
                # with it: a cache would hold nothing reusable, so the cached path runs this full
                # forward too and stays exactly equal to the reference. RoPE's first-layer keys
                # would only turn, but from the second layer on they depend on the tokens each one
                # sees, which change as the window's first token drops out: the same full forward.
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
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
        return idx
