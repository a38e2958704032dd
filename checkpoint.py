"""
Where a model comes from and where it goes: the device and precision it runs at, checkpoints
written and read, GPT-2's weights in the Hugging Face layout, and one call that gives a ready
model with its tokenizer:

    from checkpoint import load_model
    model, tok, ckpt = load_model('out-shakespeare-char-cpu', device='cpu')   # a run's folder
    model, tok, ckpt = load_model('gpt2-xl', device='cuda')                   # OpenAI's GPT-2 (ckpt is None)

train.py, sample.py, bench.py and export_hf.py use it; model.py knows nothing of files.
A checkpoint is one torch.save dict with nanoGPT's keys (model, optimizer, model_args, iter_num,
best_val_loss, config) and what exact resumption adds (scaler, rng_state, cuda_rng_state). It holds
plain tensors and values only, so it loads with weights_only=True and loading never runs code.
"""

import glob
import importlib.util
import inspect
import json
import os
import re
import shutil
import socket
import time
import zipfile
from contextlib import nullcontext, suppress

try:
    import fcntl  # POSIX: Linux and macOS
except ImportError:  # Windows: runs are not locked
    fcntl = None

import numpy as np
import torch

from model import GPT, GPTConfig
from tokenizer import DATA_DIR, DataError, gpt2_tokenizer, load_meta, load_tokenizer

# -----------------------------------------------------------------------------
# device and precision


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


def step_seed(seed, iter_num, micro_step):
    """The seed of the dropout masks of one global micro-step: like its batch (DESIGN.md, Determinism) a pure
    function of (seed, iter_num, global micro-step index). So the processes of a run draw different masks
    (one seed for all would correlate the noise across the global batch), 2 processes draw the masks 1
    process does, and a resumed run draws the masks the uninterrupted one did, on every device type."""
    return int(np.random.SeedSequence([seed, 3, iter_num, micro_step]).generate_state(1, np.uint64)[0])


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
    return peak_flops_of(gpu) or (None, f"no peak figure for the {gpu} in checkpoint.PEAK_FLOPS")


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


def memory_summary(need):
    """GPT.estimate_memory's dict in words: '14.2 GB (weights 0.7 GB, ..., activations 12.1 GB)'."""
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


def is_out_of_memory(e):
    """An allocation failed: CUDA's and MPS's OutOfMemoryError, Python's MemoryError, or the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory: you tried to allocate ...")."""
    if isinstance(e, (MemoryError, getattr(torch, 'OutOfMemoryError', MemoryError))):
        return True
    message = str(e)
    return isinstance(e, RuntimeError) and any(s in message for s in (
        "can't allocate memory", 'DefaultCPUAllocator', 'out of memory'))


# -----------------------------------------------------------------------------
# checkpoints of train.py (and nanoGPT)


class CheckpointError(Exception):
    """A checkpoint could not be written (no space, an I/O error, no permission); the old one is untouched."""


def tensor_bytes(obj):
    """Bytes of the tensors in obj (dicts and lists of them): about a checkpoint's size on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(map(tensor_bytes, obj.values()))
    return sum(map(tensor_bytes, obj)) if isinstance(obj, (list, tuple)) else 0


def save_checkpoint(checkpoint, path):
    """torch.save to a temporary file, pushed to the disk, then renamed over path: whenever the
    machine dies, path holds a whole checkpoint (the old one or the new one). Any error while writing
    (a full disk, an I/O error) removes the temporary file and is a CheckpointError saying how much
    space the folder has and the checkpoint needs; path is then still the old checkpoint."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            os.remove(tmp)  # a half-written file would only fill the disk further
        if not isinstance(e, Exception):
            raise  # Ctrl-C: the interrupt goes on, with nothing left behind
        while e.__context__ is not None and not isinstance(e, OSError):
            e = e.__context__  # torch.save's RuntimeError ('unexpected pos') hides the OSError that caused it
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}".splitlines()[0]
        folder = os.path.dirname(os.path.abspath(path))
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
        raise CheckpointError(f"cannot write {path} ({why}); {folder} has {human_bytes(free)} free, "
                              f"the checkpoint needs {human_bytes(tensor_bytes(checkpoint))}") from None


# nanoGPT's GPTConfig has these fields only: a checkpoint's model_args holds exactly them, so that nanoGPT's
# sample.py and train.py read our files (GPTConfig(**model_args)); the settings it lacks go in 'arch'
NANOGPT_MODEL_ARGS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout')


def split_model_args(args):
    """(model_args, arch) of GPTConfig's fields: nanoGPT's keys, and the rest (flash, gelu, the switches)."""
    return ({k: v for k, v in args.items() if k in NANOGPT_MODEL_ARGS},
            {k: v for k, v in args.items() if k not in NANOGPT_MODEL_ARGS})


def load_checkpoint(path, device, optimizer=True, mmap=True, **overrides):
    """Load a checkpoint written by train.py into a GPT on device. Returns (model, checkpoint).
    optimizer=False drops the optimizer's state (AdamW's two moments: twice the weights) unread.
    overrides change settings that do not touch the weights (dropout, flash). model_args and arch are
    merged (older files hold everything in model_args; nanoGPT's have no arch).
    mmap: the file is mapped, not read (torch.load(mmap=True)): a tensor takes memory once it is used,
    so what is dropped never does; the model is made on the 'meta' device and takes the file's tensors
    (assign=True) instead of copies, then moves to device. On the CPU its weights are then the file's pages
    (copy-on-write: training changes memory, never the file), which train.py avoids (mmap=False)."""
    mmap = mmap and zipfile.is_zipfile(path)  # torch.save's format since PyTorch 1.6; older files are read whole
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, not a checkpoint, or holding objects that are not plain data
        first_line = (str(e).strip().splitlines() or [''])[0]
        raise ValueError(f"cannot load checkpoint {path} ({type(e).__name__}: {first_line})") from None
    if not isinstance(checkpoint, dict) or not {'model', 'model_args', 'iter_num'} <= checkpoint.keys():
        raise ValueError(f"cannot load checkpoint {path}: it is not one written by train.py or nanoGPT "
                         f"(no 'model', 'model_args' and 'iter_num' in it)")
    if not optimizer:
        checkpoint.pop('optimizer', None)
    # a model saved after torch.compile has its names prefixed with '_orig_mod.'
    state_dict = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint.pop('model').items()}
    with torch.device('meta'):  # shapes only: no memory, no time spent on an initialisation overwritten next
        model = GPT(GPTConfig(**{**checkpoint['model_args'], **checkpoint.get('arch', {}), **overrides}))
    model.load_state_dict(state_dict, assign=True)
    model.transformer.wte.weight = model.lm_head.weight  # tied again: assign gave each name its own Parameter
    model.to(device)
    return model, checkpoint  # without 'model': its tensors are the model's now


class RunLock:
    """out_dir/train.lock, held by one train.py while it runs, so that a second one on the same folder refuses
    instead of writing last.pt and log.jsonl over the first's. The lock is the kernel's (flock): a process that
    dies in any way (kill -9, a crash, a reboot) holds it no longer, so a resume after a crash takes it over,
    and says whose it was. The file names the holder (pid, host, start) for the message. Use it as a context
    manager, or call release(); on a filesystem without locks (some network mounts) it warns and holds none."""

    def __init__(self, out_dir):
        self.path, self.fd, self.notice = os.path.join(out_dir, 'train.lock'), None, ''
        if fcntl is None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 1000).decode(errors='replace').strip() or 'a process starting up'
                os.close(fd)
                raise ValueError(f"{out_dir} is in use by another train.py ({holder}): wait for it to end or stop "
                                 f"it, or give this run another --out_dir") from None
            except OSError as e:
                os.close(fd)
                self.notice = f"warning: cannot lock {self.path} ({e.strerror}): a second run would go unnoticed"
                return
            with suppress(FileNotFoundError):  # the holder releases by deleting: was this file deleted meanwhile?
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            os.close(fd)
        self.fd, left_by = fd, os.read(fd, 1000).decode(errors='replace').strip()  # a dead run's words
        if left_by:  # a run that was killed (kill -9, a crash, a reboot) left its file; the kernel freed its lock
            self.notice = f"taking over {self.path} from a run that is no longer running ({left_by})"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)

    def release(self):
        if self.fd is not None:  # delete before unlocking: a run waiting on this file then opens a new one
            with suppress(OSError):
                os.remove(self.path)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# -----------------------------------------------------------------------------
# GPT-2's weights in the Hugging Face layout (export_hf.py writes it). It differs from model.py's in two
# ways: names may lack the 'transformer.' prefix, and c_attn, c_proj and c_fc store their weights
# transposed, (in, out), because OpenAI's code multiplied by them through a "Conv1D" layer, not nn.Linear.

# the hub's GPT-2s as (n_layer, n_head, n_embd): 124M, 350M, 774M and 1558M parameters
GPT2_SIZES = {'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024),
              'gpt2-large': (36, 20, 1280), 'gpt2-xl': (48, 25, 1600)}
HF_CONV1D = ('c_attn.weight', 'c_proj.weight', 'c_fc.weight')  # weights HF's GPT-2 stores transposed, (in, out)
HF_GELU = {'gelu_new': 'tanh', 'gelu_pytorch_tanh': 'tanh', 'gelu': 'exact'}  # activation_function -> GPTConfig.gelu


def download_gpt2(name):
    """The hub's GPT-2 folder, cached by huggingface_hub (which reads HF_ENDPOINT and HF_HUB_OFFLINE)."""
    if name not in GPT2_SIZES:
        raise ValueError(f"'{name}' is not a folder, nor one of {', '.join(GPT2_SIZES)}")
    try:
        from huggingface_hub import snapshot_download  # comes with transformers
    except ImportError:
        raise ImportError(f"downloading '{name}' needs the Hugging Face hub client: pip install transformers") from None
    repo = f'openai-community/{name}'  # where OpenAI's models live on the hub ('gpt2' alone is a redirect)
    try:
        return snapshot_download(repo, allow_patterns=['config.json', 'model.safetensors'])
    except Exception as e:  # offline, a proxy, a wrong HF_ENDPOINT, a revoked repo...
        first_line = (str(e).strip().splitlines() or [''])[0]
        raise ValueError(f"cannot download '{name}' from the Hugging Face hub ({type(e).__name__}: {first_line}); "
                         f"where it is reachable, run 'hf download {repo} config.json model.safetensors "
                         f"--local-dir {name}', copy that folder here and pass its path instead") from None


def read_config(folder):
    """GPTConfig's arguments for the GPT-2 of a folder's config.json (transformers' GPT2Config)."""
    path = os.path.join(folder, 'config.json')
    try:
        with open(path, encoding='utf-8') as f:
            hf = json.load(f)
        args = dict(n_layer=hf['n_layer'], n_head=hf['n_head'], n_embd=hf['n_embd'], block_size=hf['n_positions'],
                    vocab_size=hf['vocab_size'], bias=True, gelu=HF_GELU.get(hf.get('activation_function', 'gelu_new')))
    except (OSError, ValueError, KeyError, TypeError) as e:  # no file, not JSON, a missing key, not a dict
        raise ValueError(f"{path} is not a GPT-2 config.json ({type(e).__name__}: {e})") from None
    # refuse the settings this model does not compute, rather than give other logits
    unsupported = [f"{k}={hf.get(k)!r}" for k, ok in [
        ('model_type', hf.get('model_type') == 'gpt2'),
        ('activation_function', args['gelu'] is not None),
        ('n_inner', hf.get('n_inner') in (None, 4 * hf['n_embd'])),
        ('layer_norm_epsilon', hf.get('layer_norm_epsilon', 1e-5) == 1e-5),
        ('scale_attn_weights', hf.get('scale_attn_weights', True)),
        ('scale_attn_by_inverse_layer_idx', not hf.get('scale_attn_by_inverse_layer_idx', False)),
    ] if not ok]
    if unsupported:
        raise ValueError(f"{path}: this GPT does not implement {', '.join(unsupported)}")
    return args


def read_files(folder):
    """{name: tensor} of a Hugging Face folder: model.safetensors or pytorch_model.bin, or the
    shards of a large model (model-00001-of-00003.safetensors, ...)."""
    paths = (sorted(glob.glob(os.path.join(glob.escape(folder), 'model*.safetensors'))) or
             sorted(glob.glob(os.path.join(glob.escape(folder), 'pytorch_model*.bin'))))
    if not paths:
        raise ValueError(f"{folder} has no model.safetensors nor pytorch_model.bin")
    if paths[0].endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"reading {paths[0]} needs safetensors: pip install safetensors") from None
    else:  # weights_only: the file can hold only tensors, so loading it never runs code (a pickle can)
        load_file = lambda path: torch.load(path, map_location='cpu', weights_only=True)
    state_dict = {}
    for path in paths:
        try:
            state_dict.update(load_file(path))
        except Exception as e:  # truncated, or not what its name says
            first_line = (str(e).strip().splitlines() or [''])[0]
            raise ValueError(f"cannot read {path} ({type(e).__name__}: {first_line})") from None
    return state_dict


def read_weights(folder):
    """The weights of a folder as model.py's GPT names them: its state_dict (lm_head tied to wte)."""
    weights = read_files(folder)
    lm_head = weights.pop('lm_head.weight', None)  # absent when saved tied, as transformers does
    state_dict = {}
    for k, v in weights.items():
        k = k.removeprefix('transformer.')  # GPT2LMHeadModel's files say transformer.h.0..., GPT2Model's h.0...
        if k.endswith(('.attn.bias', '.attn.masked_bias')):
            continue  # the causal mask, which older transformers saved as a buffer: not a weight
        state_dict['transformer.' + k] = v.t() if k.endswith(HF_CONV1D) else v  # Conv1D's (in, out) -> (out, in)
    wte = state_dict.get('transformer.wte.weight')
    if wte is not None:
        if lm_head is not None and not torch.equal(lm_head, wte):
            raise ValueError(f"{folder}: lm_head differs from wte, but this GPT ties them (weight tying, as GPT-2)")
        state_dict['lm_head.weight'] = wte
    return state_dict


def from_pretrained(name_or_path, override_args=None):
    """GPT-2's weights: 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl' from the Hugging Face hub, or a
    local folder in its layout (config.json, model.safetensors or pytorch_model.bin). override_args may
    set what leaves the weights alone: dropout (default 0.0), flash."""
    override_args = override_args or {}
    if set(override_args) - {'dropout', 'flash'}:
        raise ValueError(f"from_pretrained overrides only dropout and flash, not {sorted(override_args)}")
    folder = name_or_path if os.path.isdir(name_or_path) else download_gpt2(name_or_path)
    model = GPT(GPTConfig(**{**read_config(folder), 'dropout': 0.0, **override_args}))
    try:
        model.load_state_dict(read_weights(folder))  # copies, casting float16/bfloat16 files to float32
    except RuntimeError as e:  # missing or unexpected names, other shapes: torch's message lists them
        message = ' '.join(str(e).split())[:300]  # in one line
        raise ValueError(f"{folder}: the weights do not fit its config.json ({message})") from None
    return model


def grow_for_chat(model, base, meta, vocab_size):
    """Fit a base model to a chat dataset (meta) whose ids extend its tokenizer: the ids it never learned (the
    template's markers, new characters) get fresh rows of wte (model.grow_vocab), which grows to vocab_size rows
    if smaller. base: the checkpoint the model came from (None: GPT-2's weights). Returns (ids the base knew,
    rows added); a ValueError when the base learned another tokenizer, which growing cannot mend."""
    data = os.path.join(DATA_DIR, base['config'].get('dataset', '')) if base else None
    known = (load_meta(data)['vocab_size'] if data and os.path.isfile(os.path.join(data, 'meta.json')) else
             meta['chat']['base_vocab_size'] if base else 50257)  # GPT-2's weights: its 50,257 ids
    if not meta['chat']['base_vocab_size'] <= known <= meta['vocab_size'] or model.config.vocab_size < known:
        raise ValueError(f"the model knows {known:,} ids, but the chat data's extend a tokenizer of "
                         f"{meta['chat']['base_vocab_size']:,}: its vocabulary cannot be grown to fit another tokenizer")
    return known, model.grow_vocab(vocab_size, known)


# -----------------------------------------------------------------------------
# one call: a ready model and its tokenizer, from wherever it is


def find_checkpoint(out_dir, ckpt_name='ckpt.pt'):
    """out_dir/ckpt_name; for ckpt.pt, out_dir/last.pt when a run stopped before its first evaluation."""
    path = os.path.join(out_dir, ckpt_name)
    if not os.path.isfile(path) and ckpt_name == 'ckpt.pt' and os.path.isfile(os.path.join(out_dir, 'last.pt')):
        path = os.path.join(out_dir, 'last.pt')
        print(f"(no ckpt.pt yet: using {path})")
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}: train one first (python train.py ...), or fix --out_dir")
    return path


def load_model(source, device='cpu', ckpt_name='ckpt.pt', **overrides):
    """(model, tokenizer, checkpoint) from source, in eval mode on device:
    - a run's out_dir (train.py's or nanoGPT's): its ckpt_name, with the tokenizer of its dataset;
    - a checkpoint file (path/to/last.pt), likewise;
    - 'gpt2' ... 'gpt2-xl' or a Hugging Face folder (config.json): GPT-2's weights and BPE (checkpoint None).
    overrides: dropout, flash (eval mode turns dropout off anyway). A ValueError or DataError says in one
    line what is wrong; an ImportError names the pip install a Hugging Face folder or download needs."""
    if source in GPT2_SIZES or os.path.isfile(os.path.join(source, 'config.json')):
        model = from_pretrained(source, overrides)
        tok = gpt2_tokenizer()
        if model.config.vocab_size != tok.n_vocab:
            raise ValueError(f"{source} has a vocabulary of {model.config.vocab_size:,} tokens, not GPT-2's "
                             f"{tok.n_vocab:,}: load the checkpoint it was exported from instead")
        checkpoint = None
    else:
        path = source if os.path.isfile(source) else find_checkpoint(source, ckpt_name)
        model, checkpoint = load_checkpoint(path, device, optimizer=False, **overrides)  # the weights alone
        dataset = checkpoint.get('config', {}).get('dataset')
        if dataset is None:
            raise ValueError(f"{path} does not say which dataset it was trained on (config['dataset'])")
        data_dir = os.path.join(DATA_DIR, dataset)
        meta = load_meta(data_dir)
        tok = load_tokenizer(meta, data_dir)
        if meta['vocab_size'] > model.config.vocab_size:
            raise DataError(f"data/{dataset} now has a vocabulary of {meta['vocab_size']:,}, but the model was "
                            f"trained on {model.config.vocab_size:,}: prepare the dataset again as it was for this model")
    model.to(device)
    model.eval()
    return model, tok, checkpoint
