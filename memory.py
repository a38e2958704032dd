"""
What a training step needs in memory, how much there is, and what to do when it runs out. train.py
prints the estimate before its first step and turns an out-of-memory error anywhere into one line
saying where it happened, the estimate and a batch size that fits:

    log(memory_report(model.config, batch_size, dtype, gradient_accumulation_steps, world, device))
    sys.excepthook = exit_on_oom(model.config, batch_size, dtype, gradient_accumulation_steps, ...)

docs/reliability.md compares the estimate with measured peaks.
"""

import os
import sys
import traceback
from contextlib import suppress

import torch


def device_memory(device):
    """Bytes this process may use on device, or None where unknown: on a GPU what is free plus what
    PyTorch already holds; on the CPU the RAM Linux calls available (/proc/meminfo), elsewhere all
    of it (sysconf), and at most what a limit on the address space (ulimit -v) leaves."""
    kind = device.split(':')[0]
    if kind == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    if kind == 'mps':
        return getattr(torch.mps, 'recommended_max_memory', lambda: None)()
    ram = used = None
    with suppress(OSError, StopIteration):
        with open('/proc/meminfo') as f:
            ram = next(int(line.split()[1]) * 1024 for line in f
                       if line.startswith('MemAvailable:'))
        with open('/proc/self/status') as f:
            used = next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmSize:'))
    if ram is None:
        with suppress(OSError, ValueError, AttributeError):
            ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    with suppress(ImportError):
        import resource
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY and used is not None:
            ram = min(ram or limit, max(limit - used, 0))
    return ram


def human_bytes(n):
    """1234567 -> '1.2 MB': sizes in messages."""
    for power, unit in ((9, 'GB'), (6, 'MB'), (3, 'kB')):
        if n >= 10 ** power:
            return f"{n / 10 ** power:,.1f} {unit}"
    return f"{n:,} bytes"


def count_parameters(cfg):
    """The parameters of a GPT of GPTConfig cfg, counted from its shapes (model.py's layers)."""
    C, hs, hidden, b = cfg.n_embd, cfg.head_size, cfg.hidden_size, int(cfg.bias)
    q_kv = (cfg.n_head + 2 * (cfg.n_kv_head or cfg.n_head)) * hs  # c_attn's outputs
    up = 2 * hidden if cfg.swiglu else hidden  # c_fc's outputs
    norm = C if cfg.rmsnorm else C * (1 + b)
    attention = (C + b) * q_kv + (cfg.n_head * hs + b) * C + (2 * hs if cfg.qk_norm else 0)
    mlp = (C + b) * up + (hidden + b) * C
    embeddings = cfg.vocab_size * C * (1 if cfg.tie_embeddings else 2)
    return embeddings + (0 if cfg.rope else cfg.block_size * C) + \
        cfg.n_layer * (2 * norm + attention + mlp) + norm


def estimate_memory(cfg, batch_size, dtype='float32'):
    """Bytes a training step needs, estimated: {weights, gradients, optimizer, activations, total},
    for micro-batches of batch_size x block_size under dtype's autocast (eager, one process).
    Per parameter: float32 weights 4 (and the half copies autocast makes for the matmuls, 2),
    gradients 4, AdamW's two moments 8. Activations, what autograd keeps for the backward, in bytes
    per token, with a = 2 (bfloat16/float16) or 4 (float32), h = n_embd, V = vocab_size; per layer:
        the residual stream at the two norms' inputs, float32    2 * 4h
        the norms' outputs, as c_attn and c_fc read them         2 * a h
        q, k, v (c_attn's output)                                a (h + 2 kv)   kv: n_kv_head * hs
          (GQA: k and v repeated to every query head             2 a h)
        attention's output (c_proj's input)                      a h
        c_fc's output and GELU's                                 2 * a 4h       (SwiGLU: 4 a hidden)
        flash=False: the (n_head, T) softmax of each query       a n_head T
    = 64h in float32 and 36h in bfloat16 for GPT-2's block; Korthikanti et al. 2022 ("Reducing
    Activation Recomputation in Large Transformer Models", 4.1) count 34h in 16 bits (theirs has
    dropout's masks and a 16-bit residual stream). Then ln_f (4h + a h) and the logits: a V, 4V (the
    cross-entropy's float32 log-probabilities) and 8V (two float32 gradients). Not counted:
    torch.compile's fusions (less), DDP's buckets (4 bytes per parameter)."""
    a = 4 if dtype == 'float32' else 2
    h, q, kv = cfg.n_embd, cfg.n_head * cfg.head_size, (cfg.n_kv_head or cfg.n_head) * cfg.head_size
    mlp = 4 * a * cfg.hidden_size if cfg.swiglu else 2 * a * cfg.hidden_size
    layer = 8 * h + a * (2 * h + q + 2 * kv + (2 * q if kv != q else 0) + q) + mlp
    layer += 0 if cfg.flash else a * cfg.n_head * cfg.block_size
    per_token = cfg.n_layer * layer + 4 * h + a * h + (a + 12) * cfg.vocab_size
    n = count_parameters(cfg)
    need = dict(weights=n * (4 if a == 4 else 6), gradients=4 * n, optimizer=8 * n,
                activations=per_token * batch_size * cfg.block_size)
    return dict(need, total=sum(need.values()))


def memory_summary(need):
    """estimate_memory's dict in words: '14.2 GB (weights 0.7 GB, ..., activations 12.1 GB)'."""
    parts = ', '.join(f"{'AdamW' if k == 'optimizer' else k} {human_bytes(v)}"
                      for k, v in need.items() if k != 'total')
    return f"{human_bytes(need['total'])} ({parts})"


def memory_fix(need, memory, batch_size, gradient_accumulation_steps, world=1, building=False):
    """What makes a step fit in memory (bytes, None if unknown): where it can, a smaller micro-batch
    (the largest the estimate fits, at most half the old) and more accumulation steps: the same
    tokens per step, so the same recipe."""
    fixed, sequences = need['total'] - need['activations'], batch_size * gradient_accumulation_steps
    if building or batch_size == 1 or (memory and fixed > memory):
        return ("a smaller model (--n_layer, --n_embd), a shorter --block_size, or torchrun with "
                "--fsdp=True")
    per_sequence = need['activations'] / batch_size
    fits = int((memory - fixed) // per_sequence) if memory else batch_size // 2
    b = next(b for b in range(max(1, min(fits, batch_size // 2)), 0, -1)
             if sequences % (b * world) == 0)
    return (f"--batch_size={b} --gradient_accumulation_steps={sequences // b} keeps the tokens per "
            f"step")


def memory_report(cfg, batch_size, dtype, gradient_accumulation_steps, world, device):
    """What a training step of a GPTConfig needs (estimate_memory) and what device has, in words;
    with a warning and the fix when it is more than there is."""
    need, memory = estimate_memory(cfg, batch_size, dtype), device_memory(device)
    report = (f"memory a step needs, estimated: {memory_summary(need)} in {dtype}; "
              f"{human_bytes(memory or 0)} available")
    if memory and need['total'] > memory:
        report += (f"\nwarning: more than there is, expect an out-of-memory error: "
                   f"{memory_fix(need, memory, batch_size, gradient_accumulation_steps, world)}")
    return report


def is_out_of_memory(e):
    """An allocation failed: CUDA's and MPS's OutOfMemoryError, Python's MemoryError, or the CPU
    allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory: ...")."""
    if isinstance(e, (MemoryError, getattr(torch, 'OutOfMemoryError', MemoryError))):
        return True
    return isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("can't allocate memory", 'DefaultCPUAllocator', 'out of memory'))


def exit_on_oom(cfg, batch_size, dtype, gradient_accumulation_steps, world, device):
    """An excepthook: out of memory anywhere ends in one line saying where (building the model, in
    a training step or in an evaluation: read off the traceback), the estimate for a model of cfg
    and the fix, not a traceback; exit status 1. Nothing was saved, so the checkpoints on disk are
    those from before. Any other exception keeps its traceback."""
    memory = device_memory(device)  # now: once out of memory, reading it may fail too

    def hook(kind, e, tb):
        if not is_out_of_memory(e):
            return sys.__excepthook__(kind, e, tb)
        functions = {frame.name for frame in traceback.extract_tb(tb)}
        stage = ('in an evaluation' if 'estimate_loss' in functions else
                 'in a training step' if functions & {'forward', 'backward', 'step'} else
                 'building the model')
        need = estimate_memory(cfg, batch_size, dtype)
        fix = memory_fix(need, memory, batch_size, gradient_accumulation_steps, world,
                         stage == 'building the model')
        print(f"error: out of memory {stage} on {device} ({type(e).__name__}); a step needs "
              f"{memory_summary(need)} by the estimate, of {human_bytes(memory or 0)} available: "
              f"{fix}", file=sys.stderr)
    return hook
