"""
Where and how a model runs: the device, the precision (and float16's GradScaler), compile and the attention
path, the distributed backend, the accumulation split and FSDP's sharding, forking the random state,
memory (how much there is, what a step needs, what to do when it runs out: exit_on_oom; freed memory reused
instead of faulted in afresh: keep_freed_memory), the peak FLOPs MFU is measured against, and how processes
stop: together on an error (fail_together), at a signal (StopSignals), at the end (end_processes).

    from devices import autocast_context, pick_device, pick_dtype
    device = pick_device('auto')              # 'cuda', 'mps' or 'cpu': the best the machine has
    dtype = pick_dtype('auto', device)        # bfloat16 where it is native, float16 on older GPUs, else float32
    with autocast_context(device, dtype): ...

Every choice is a function of explicit arguments (a GPU's answers can be passed in), so the tests check
them on a machine without a GPU. train.py, sample.py, chat.py, eval.py and bench.py use it.
"""

import atexit
import ctypes
import importlib.util
import inspect
import os
import re
import signal
import sys
from contextlib import nullcontext, suppress

import torch


def pick_device(device='auto'):
    """'auto' is the best the machine has: CUDA, then Apple's MPS, then the CPU."""
    if device == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        if torch.backends.mps.is_available():
            return 'mps'
        return 'cpu'
    kind = device.split(':')[0]
    available = {'cpu': True, 'cuda': torch.cuda.is_available(), 'mps': torch.backends.mps.is_available()}
    if not available.get(kind, False):
        have = ', '.join(k for k, ok in available.items() if ok)
        raise ValueError(f"device '{device}' is not available on this machine; available: {have} (or 'auto')")
    return device


def cpu_has_bf16():
    """Native bfloat16 matmuls on this CPU (AVX512-BF16 or AMX, as in recent Xeons and EPYCs)."""
    return any(getattr(torch.cpu, f, lambda: False)() for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))


def keep_freed_memory():
    """Let this process reuse the memory its tensors free, instead of handing it back to the kernel (glibc,
    64-bit; elsewhere nothing is changed). glibc maps a block over 128 KiB (a threshold it moves) afresh and
    returns a freed heap top, so each step's activations come back as fresh pages the kernel must fault in
    and zero: 150-2500 page faults a step on nanoGPT's CPU command, and 4-6 ms of its 29-34 (docs/speed.md).
    Blocks up to 32 MiB (mallopt's largest on 64-bit) then come from the heap, and 64 MiB of free top is
    kept. Where glibc's own settings are made (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or
    GLIBC_TUNABLES' malloc ones), they stand (test_fsdp_memory counts mapped blocks with one).
    Returns whether it took effect."""
    if {'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_'} & set(os.environ) or \
            'malloc' in os.environ.get('GLIBC_TUNABLES', '') or sys.maxsize < 2 ** 32:
        return False
    try:
        os.confstr('CS_GNU_LIBC_VERSION')  # glibc; elsewhere (musl, macOS, Windows) an error
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already has
    except (AttributeError, OSError, TypeError, ValueError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20) and mallopt(M_TRIM_THRESHOLD, 64 << 20))


def use_device(device, local_rank=None, gpus=None):
    """The device of this process, made current: under torchrun (local_rank given) GPU number local_rank of
    its machine. torch.cuda.set_device for any CUDA device, so that what asks the 'current' GPU (the random
    state, is_bf16_supported, pinned memory, NCCL) asks this one, not GPU 0. gpus: how many are visible
    (None asks torch)."""
    if not device.startswith('cuda'):
        return device
    gpus = torch.cuda.device_count() if gpus is None else gpus
    index = local_rank if local_rank is not None else int(device.partition(':')[2] or 0)
    if index >= gpus and local_rank is not None:  # rather than torch's 'invalid device ordinal' from deep inside
        raise ValueError(f"process {local_rank} of this machine has no GPU: {gpus} visible (CUDA_VISIBLE_DEVICES); "
                         f"start at most --nproc_per_node={gpus}")
    if index >= gpus:
        raise ValueError(f"device '{device}' does not exist: {gpus} GPU(s) visible, so cuda:0 to cuda:{gpus - 1}")
    device = f'cuda:{index}'
    torch.cuda.set_device(device)
    return device


def cuda_bf16_native(device):
    """bfloat16 in the tensor cores (compute capability 8.0+: A100, RTX 30xx and later) on this CUDA device.
    torch.cuda.is_bf16_supported() alone also says True where bf16 is only emulated (V100, T4, RTX 20xx:
    slow, no tensor cores) unless including_emulation=False (PyTorch 2.3+); it asks about the current
    device, which use_device has set."""
    if 'including_emulation' in inspect.signature(torch.cuda.is_bf16_supported).parameters:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.version.hip is not None or tuple(torch.cuda.get_device_capability(device)) >= (8, 0)


def pick_dtype(dtype, device):
    """'auto': bfloat16 on GPUs that have it natively, float16 on older GPUs (with a GradScaler), bfloat16 on
    CPUs with native bf16 (on a 2-core AVX512-BF16 EPYC, with flash=False: 1.5-1.8x float32's
    training speed, same loss; bench.py --mode=train), else float32. After use_device."""
    if dtype == 'auto':
        if device.startswith('cuda'):
            return 'bfloat16' if cuda_bf16_native(device) else 'float16'
        return 'bfloat16' if device == 'cpu' and cpu_has_bf16() else 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(f"dtype '{dtype}' is not one of 'auto', 'float32', 'bfloat16', 'float16'")
    return dtype


def pick_compile(compile, device, capability=None, triton=None):
    """torch.compile or not, as a bool. 'auto' compiles only where its default backend can work: inductor
    writes Triton kernels for a GPU, so CUDA with Triton installed (PyTorch's Windows wheels come without it)
    on compute capability 7.0+ (Triton refuses older GPUs: torch raises GPUTooOldForTriton). On a CPU
    compile gains 1.01-1.06x after 7-50 s, so 'auto' leaves it off. capability, triton: None asks torch."""
    choice = str(compile).lower()
    if choice not in ('auto', 'true', 'false'):
        raise ValueError(f"compile must be 'auto', True or False, not '{compile}'")
    if choice != 'auto':
        return choice == 'true'
    if not device.startswith('cuda'):
        return False
    triton = importlib.util.find_spec('triton') is not None if triton is None else triton
    capability = torch.cuda.get_device_capability(device) if capability is None else capability
    return triton and tuple(capability) >= (7, 0)


def pick_backend(device, nccl=None):
    """torch.distributed's backend: NCCL between GPUs where PyTorch has it (not on Windows), else Gloo
    (CPU processes, which is how the tests run this path, and GPUs on Windows). nccl: None asks torch."""
    nccl = torch.distributed.is_nccl_available() if nccl is None else nccl
    return 'nccl' if device.startswith('cuda') and nccl else 'gloo'


def end_processes(ddp):
    """The last lines of train.py and eval.py: under torchrun all processes leave together (after the last
    collective) and the process group is closed; then atexit's handlers run (the run's lock is released,
    wandb's last upload) and the process ends at once (os._exit), without the interpreter's teardown, which
    takes 0.5-0.6 s once torch.optim has loaded torch._dynamo (1 % of nanoGPT's CPU command, issue 14). Under
    torchrun that teardown can also abort: a thread of Gloo's that still holds a finished exchange's tensors
    can need Python's lock as Python shuts down, and the process dies with "terminate called without an
    active exception": seen once in about a thousand torchrun runs of the test suite on 2 cores (the
    mechanism is described in PyTorch pull request 179291). One process run under a debugger, a profiler,
    IPython or python -i ends as usual: that tool still needs the process."""
    if ddp:
        torch.distributed.barrier()  # the master may still be writing a checkpoint while the others are done
        torch.distributed.destroy_process_group()
    elif (sys.flags.interactive or sys.gettrace() or sys.getprofile()
          or not {'bdb', 'IPython', 'pydevd'}.isdisjoint(sys.modules)):  # pdb, cProfile, %run, an IDE's debugger
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def fail_together(message, device, ddp):
    """Every process calls it; if one has a message (the others None), it is said and all stop, together. Said
    before the others learn of it: torchrun stops the rest as soon as one exits, which could cut it off."""
    if message is not None:
        print(f"error: {message}", file=sys.stderr, flush=True)
    flag = torch.tensor(float(message is not None), device=device)
    if ddp:
        torch.distributed.all_reduce(flag)
    if flag.item() > 0:
        sys.exit(1)


class StopSignals:
    """SIGTERM (a cluster preempting the job, `kill`) and SIGINT (Ctrl-C), from now on: each asks train.py to stop
    at this step, with a checkpoint, and name says which one did (None: none yet); a second one stops at once,
    without a checkpoint (KeyboardInterrupt)."""

    def __init__(self, log=print):
        self.name, self.log = None, log
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.name is not None:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        self.log(f"{self.name}: stopping at this step, with a checkpoint")


def compile_checked(model, batch, ctx, device, log=print, backend='inductor'):
    """torch.compile(model), tried on one forward and backward of batch (x, y), which is when compiling
    happens: the compiled model, or, where that fails (a compiler or Triton missing, a GPU it does not
    support), model itself after one line saying why. The random state is put back and the gradients
    dropped, so the run is the one it would have been."""
    compiled = torch.compile(model, backend=backend)
    try:
        with fork_rng(device), ctx:
            _, loss = compiled(*batch)
            loss.backward()
    except Exception as e:
        e = getattr(e, 'inner_exception', None) or e  # torch._dynamo's BackendCompilerFailed wraps the compiler's
        first_line = (str(e).strip().splitlines() or [''])[0][:200]
        log(f"torch.compile failed ({type(e).__name__}: {first_line}): training without it (--compile=False)")
        torch._dynamo.reset()
        compiled = model
    for p in model.parameters():
        p.grad = None
    return compiled


def fork_rng(device):
    """A context that puts back the random state of the CPU and of device (CUDA or MPS) when it ends."""
    kind = device.split(':')[0]
    if kind in ('cuda', 'mps'):
        return torch.random.fork_rng(devices=[device], device_type=kind)
    return torch.random.fork_rng(devices=[])


def shard(model):
    """FSDP2 over the processes (fully_shard), each Block, then the rest: each process keeps 1/world of every
    parameter; a Block's full weights are gathered just before it runs and freed after, so the model, its
    gradients and AdamW's two moments need not fit on one device."""
    from torch.distributed.fsdp import fully_shard
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def grad_scaler(device_type, dtype, sharded):
    """float16's narrow range underflows small gradients: the scaler scales the loss up, and unscales before
    the step. bfloat16 has float32's range and needs no scaler: for any other dtype it is a no-op
    (enabled=False). sharded (FSDP): ShardedGradScaler, which agrees on an overflow across processes."""
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return ShardedGradScaler(device_type, enabled=(dtype == 'float16'))
    return torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))


def without_fused(optimizer):
    """optimizer rebuilt on its parameter groups without the fused kernel. FSDP's ShardedGradScaler.unscale_
    makes a found_inf of shape (1,), which the fused AdamW step refuses ('output with shape [] doesn't match
    the broadcast shape [1]', PyTorch issue 140514): train.py uses this under FSDP + float16."""
    if not optimizer.defaults.get('fused'):
        return optimizer
    kind = type(optimizer)
    settings = {k: v for k, v in optimizer.defaults.items() if k in inspect.signature(kind).parameters}
    return kind([dict(g, fused=False) for g in optimizer.param_groups], **dict(settings, fused=False))


def check_accumulation(steps, world):
    """gradient_accumulation_steps counts the micro-batches of all processes together: each takes steps / world."""
    if steps % world:
        below, above = (steps // world) * world, (steps // world + 1) * world
        nearest = f"{below} or {above}" if below else f"{above}"
        raise ValueError(f"gradient_accumulation_steps {steps} is not divisible by the {world} processes: make it "
                         f"a multiple of {world} (the nearest: {nearest}; batch_size x block_size x it = tokens per step)")


def pick_flash(flash, device, dtype):
    """The attention path: 'auto' is the written-out attention (False) under CPU bfloat16 autocast and the
    fused kernel (True) everywhere else; True or False (or the strings 'True', 'False') force one.
    Measured with torch 2.13 on 2 cores of an AVX512-BF16 EPYC, ms per training step of nanoGPT's CPU
    command's shape (bench.py --mode=train --variants=fused,manual+fused,bf16+fused,bf16+manual+fused):
    bf16 fused 31.5 ms a step in train.py against 19.9 ms written out (issue 14; bench.py: 1.6x), as
    PyTorch's CPU bf16 fused-attention backward is 5x slower than in float32 (model.py); in float32 the
    two paths run at the same speed, and on GPUs the fused kernel (FlashAttention) is the faster one."""
    choice = {'auto': None, 'true': True, 'false': False}.get(str(flash).lower(), 'bad')
    if choice == 'bad':
        raise ValueError(f"flash must be 'auto', True or False, not '{flash}'")
    if choice is None:
        return not (device.split(':')[0] == 'cpu' and dtype == 'bfloat16')
    return choice


def autocast_context(device, dtype):
    """Mixed precision: matmuls run in dtype, weights and the optimizer stay float32."""
    if dtype == 'float32':
        return nullcontext()
    ptdtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    return torch.autocast(device_type=device.split(':')[0], dtype=ptdtype)


# Dense (not 2:4 sparse) bf16 tensor-core peaks from NVIDIA's datasheets, in FLOP/s; the first name that
# appears as whole words in torch.cuda.get_device_name wins, so the longer names come first.
PEAK_FLOPS = {
    'B200': 2250e12,  # HGX B200 datasheet: 36 PFLOPS sparse FP16/BF16 for 8 GPUs
    'H200 NVL': 835e12,  # H200 datasheet: 1,671 TFLOPS sparse
    'H200': 989e12,  # H200 SXM (device name 'NVIDIA H200'): 1,979 TFLOPS sparse
    'GH200': 989e12,  # GH200 Grace Hopper datasheet: 1,979 TFLOPS sparse (the H100/H200 GPU)
    'H100 NVL': 835e12,  # H100 datasheet, NVL column: 1,671 TFLOPS sparse
    'H100 PCIe': 756e12,  # H100 datasheet, PCIe column: 1,513 TFLOPS sparse
    'H100': 989e12,  # SXM ('NVIDIA H100 80GB HBM3'): 1,979 TFLOPS sparse
    'A100': 312e12,
    'L40S': 362e12,  # L40S datasheet: 362.05 TFLOPS (733 sparse)
    'A10G': 125e12,
    'A10': 125e12,  # A10 datasheet: 125 TFLOPS (250 sparse)
    'L4': 121e12,
    'RTX 4090': 165e12,
    'RTX 3090': 71e12,
    'V100': 125e12,
    'T4': 65e12,
}


def peak_flops_of(gpu_name):
    """(FLOP/s, name) of the PEAK_FLOPS entry for a GPU's name, or None."""
    for name, flops in PEAK_FLOPS.items():
        if re.search(rf'\b{re.escape(name)}\b', gpu_name):  # whole words: 'L4' is not 'L40S'
            return flops, f"{name} peak {flops / 1e12:.0f} TFLOPS"
    return None


def peak_flops(device):
    """(FLOP/s, name) of the reference MFU is measured against; (None, why) for a device without a
    figure here, the CPU included: an A100's peak (nanoGPT's habit) would say nothing about it."""
    if not device.startswith('cuda'):
        return None, f"no peak figure for '{device}'"
    gpu = torch.cuda.get_device_name(device)
    return peak_flops_of(gpu) or (None, f"no peak figure for the {gpu} in devices.PEAK_FLOPS")


def device_memory(device):
    """Bytes this process may use on device, or None where unknown: on a GPU what is free plus what PyTorch
    already holds; on the CPU the RAM Linux calls available (/proc/meminfo), elsewhere all of it (sysconf),
    and at most what a limit on the address space (ulimit -v, RLIMIT_AS) leaves."""
    kind = device.split(':')[0]
    if kind == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    if kind == 'mps':
        return getattr(torch.mps, 'recommended_max_memory', lambda: None)()
    ram = used = None
    with suppress(OSError, StopIteration):
        with open('/proc/meminfo') as f:
            ram = next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
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
    return next((f"{n / 10 ** p:,.1f} {unit}" for p, unit in ((9, 'GB'), (6, 'MB'), (3, 'kB')) if n >= 10 ** p),
                f"{n:,} bytes")


def estimate_memory(model, batch_size, dtype='float32'):
    """Bytes a training step needs, estimated: {weights, gradients, optimizer, activations, total}, for
    micro-batches of batch_size x block_size under dtype's autocast (train.py prints it; eager, one process).
    Per parameter: float32 weights 4 (and the half copies autocast makes for the matmuls, 2), gradients 4,
    AdamW's two moments 8. Activations, what autograd keeps for the backward, in bytes per token, with
    a = 2 (bfloat16/float16) or 4 (float32), h = n_embd, V = vocab_size; per layer:
        the residual stream at the two norms' inputs, float32    2 * 4h
        the norms' outputs, as c_attn and c_fc read them         2 * a h
        q, k, v (c_attn's output) (+ GQA's repeated k, v: 2 a h)  a (h + 2 kv)    kv = n_kv_head * head size
        attention's output (c_proj's input: a view of it)        a h
        c_fc's output and GELU's                                 2 * a 4h        (SwiGLU: 4 a hidden)
        flash=False: the (n_head, T) softmax of each query       a n_head T      (CUDA: 4 more, in float32)
    = 64h in float32 and 36h in bfloat16 for GPT-2's block. Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", sec. 4.1) count 34h in 16 bits: theirs has dropout's masks
    (2h) and a 16-bit residual stream (4h less). Then ln_f (4h + a h) and the logits: a V (lm_head's output, which train.py keeps until the next step), 4V
    (the cross-entropy's float32 log-probabilities) and 8V (two float32 gradients as the backward starts).
    The peak of live tensors on the CPU is 2% above this (test_reliability.py); allocators keep more (glibc's
    malloc 25-55% at that shape). Not counted: torch.compile's fusions (less), DDP's buckets (4 per parameter)."""
    cfg, a = model.config, (4 if dtype == 'float32' else 2)
    h, hs = cfg.n_embd, cfg.n_embd // cfg.n_head
    kv = (cfg.n_kv_head or cfg.n_head) * hs
    mlp = 4 * a * model.transformer.h[0].mlp.c_proj.in_features if cfg.swiglu else 8 * a * h
    layer = 8 * h + a * (2 * h + h + 2 * kv + (2 * h if kv != h else 0) + h) + mlp
    layer += 0 if cfg.flash else a * cfg.n_head * cfg.block_size
    per_token = cfg.n_layer * layer + 4 * h + a * h + (a + 12) * cfg.vocab_size
    n = sum(p.numel() for p in model.parameters())
    need = dict(weights=n * (4 if a == 4 else 6), gradients=4 * n, optimizer=8 * n,
                activations=per_token * batch_size * cfg.block_size)
    return dict(need, total=sum(need.values()))


def memory_summary(need):
    """estimate_memory's dict in words: '14.2 GB (weights 0.7 GB, ..., activations 12.1 GB)'."""
    parts = ', '.join(f"{'AdamW' if k == 'optimizer' else k} {human_bytes(v)}" for k, v in need.items() if k != 'total')
    return f"{human_bytes(need['total'])} ({parts})"


def memory_fix(need, memory, batch_size, gradient_accumulation_steps, world=1, building=False):
    """What makes a step fit in memory (bytes, None if unknown): where it can, a smaller micro-batch (the largest
    the estimate fits, at most half the old) and more accumulation steps, the same tokens per step: the same recipe."""
    fixed, sequences = need['total'] - need['activations'], batch_size * gradient_accumulation_steps
    if building or batch_size == 1 or (memory and fixed > memory):
        return "a smaller model (--n_layer, --n_embd), a shorter --block_size, or torchrun with --fsdp=True"
    fits = int((memory - fixed) // (need['activations'] / batch_size)) if memory else batch_size // 2
    b = next(b for b in range(max(1, min(fits, batch_size // 2)), 0, -1) if sequences % (b * world) == 0)
    return f"--batch_size={b} --gradient_accumulation_steps={sequences // b} keeps the tokens per step"


def memory_report(model, memory, batch_size, dtype, gradient_accumulation_steps, world=1):
    """What a training step of model needs by estimate_memory, and the memory there is (bytes, None: unknown),
    in words; with a warning and the fix when it is more than there is."""
    need = estimate_memory(model, batch_size, dtype)
    report = f"memory a step needs, estimated: {memory_summary(need)} in {dtype}; {human_bytes(memory or 0)} available"
    if memory and need['total'] > memory:
        report += (f"\nwarning: more than there is, expect an out-of-memory error: "
                   f"{memory_fix(need, memory, batch_size, gradient_accumulation_steps, world)}")
    return report


def is_out_of_memory(e):
    """An allocation failed: CUDA's and MPS's OutOfMemoryError, Python's MemoryError, or the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory: you tried to allocate ...")."""
    if isinstance(e, (MemoryError, getattr(torch, 'OutOfMemoryError', MemoryError))):
        return True
    message = str(e)
    return isinstance(e, RuntimeError) and any(s in message for s in (
        "can't allocate memory", 'DefaultCPUAllocator', 'out of memory'))


def exit_on_oom(where, device, memory, batch_size, gradient_accumulation_steps, world):
    """An excepthook (sys.excepthook = exit_on_oom(...)): out of memory anywhere (building the model, a step,
    an evaluation) ends in one line saying where, the estimate and the fix, not a traceback; exit status 1.
    Nothing was saved, so the checkpoints on disk are those from before. where() gives (the stage, the
    estimate_memory of a step). Any other exception keeps its traceback."""
    def hook(kind, e, traceback):
        if not is_out_of_memory(e):
            return sys.__excepthook__(kind, e, traceback)
        stage, need = where()
        fix = memory_fix(need, memory, batch_size, gradient_accumulation_steps, world, stage == 'building the model')
        print(f"error: out of memory {stage} on {device} ({type(e).__name__}); a step needs {memory_summary(need)} "
              f"by the estimate, of {human_bytes(memory or 0)} available: {fix}", file=sys.stderr)
    return hook
