"""
Where and how a model runs: the device, the precision, compile and the attention path chosen for
the machine ('auto'), the peak FLOPs MFU is measured against, and how processes stop: together on
an error (fail_together), at a signal (StopSignals).

    from devices import resolve
    device, dtype, compile, flash = resolve('auto', 'auto', 'auto', 'auto')
    # ('cuda', 'bfloat16', True, True) on an A100; ('cpu', 'bfloat16', False, False) on a CPU with
    # native bf16; ('cpu', 'float32', False, True) on others

Every choice is a function of explicit arguments (a GPU's answers can be passed in), so the tests
check them on a machine without a GPU. docs/devices.md has what was measured behind each.
"""

import importlib.util
import inspect
import re
import signal
import sys

import torch


def pick_device(device='auto'):
    """'auto' is the best the machine has: CUDA, then Apple's MPS, then the CPU."""
    if device == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        return 'mps' if torch.backends.mps.is_available() else 'cpu'
    kind = device.split(':')[0]
    available = {'cpu': True, 'cuda': torch.cuda.is_available(),
                 'mps': torch.backends.mps.is_available()}
    if not available.get(kind, False):
        have = ', '.join(k for k, ok in available.items() if ok)
        raise ValueError(f"device '{device}' is not available on this machine; available: {have} "
                         f"(or 'auto')")
    return device


def use_device(device, local_rank=None, gpus=None):
    """The device of this process, made current: under torchrun (local_rank given) GPU number
    local_rank of its machine. torch.cuda.set_device, so that what asks the 'current' GPU (the
    random state, is_bf16_supported, NCCL) asks this one, not GPU 0. gpus: how many are visible
    (None asks torch)."""
    if not device.startswith('cuda'):
        return device
    gpus = torch.cuda.device_count() if gpus is None else gpus
    index = local_rank if local_rank is not None else int(device.partition(':')[2] or 0)
    if index >= gpus and local_rank is not None:  # not torch's 'invalid device ordinal' from inside
        raise ValueError(f"process {local_rank} of this machine has no GPU: {gpus} visible "
                         f"(CUDA_VISIBLE_DEVICES); start at most --nproc_per_node={gpus}")
    if index >= gpus:
        raise ValueError(f"device '{device}' does not exist: {gpus} GPU(s) visible, so cuda:0 to "
                         f"cuda:{gpus - 1}")
    device = f'cuda:{index}'
    torch.cuda.set_device(device)
    return device


def cpu_has_bf16():
    """Native bfloat16 matmuls on this CPU (AVX512-BF16 or AMX, as in recent Xeons and EPYCs)."""
    return any(getattr(torch.cpu, f, lambda: False)()
               for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))


def cuda_bf16_native(device):
    """bfloat16 in the tensor cores (compute capability 8.0+: A100, RTX 30xx and later).
    torch.cuda.is_bf16_supported() alone also says True where bf16 is only emulated (V100, T4, RTX
    20xx: slow) unless including_emulation=False (PyTorch 2.3+)."""
    if 'including_emulation' in inspect.signature(torch.cuda.is_bf16_supported).parameters:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return (torch.version.hip is not None
            or tuple(torch.cuda.get_device_capability(device)) >= (8, 0))


def pick_dtype(dtype, device):
    """'auto': bfloat16 on GPUs that have it natively, float16 on older GPUs (with a GradScaler),
    bfloat16 on CPUs with native bf16 (1.5-1.8x float32's training speed, the same loss:
    docs/speed.md), else float32. After use_device."""
    if dtype == 'auto':
        if device.startswith('cuda'):
            return 'bfloat16' if cuda_bf16_native(device) else 'float16'
        return 'bfloat16' if device == 'cpu' and cpu_has_bf16() else 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(f"dtype '{dtype}' is not one of 'auto', 'float32', 'bfloat16', 'float16'")
    return dtype


def pick_compile(compile, device, capability=None, triton=None):
    """torch.compile or not, as a bool. 'auto' compiles only where its default backend works:
    inductor writes Triton kernels for a GPU, so CUDA with Triton installed (PyTorch's Windows
    wheels have none) on compute capability 7.0+. On a CPU compiling gains little for its 7-50 s
    (docs/speed.md), so 'auto' leaves it off. capability, triton: None asks torch."""
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


def pick_flash(flash, device, dtype):
    """The attention path: 'auto' is the written-out attention (False) under CPU bfloat16 autocast,
    the fused kernel (True) everywhere else; True or False force one. PyTorch's CPU bf16 fused
    attention has a slow backward, so there the written-out one trains faster (docs/speed.md); in
    float32 the two run at the same speed, and on GPUs the fused kernel is the faster one."""
    choice = {'auto': None, 'true': True, 'false': False}.get(str(flash).lower(), 'bad')
    if choice == 'bad':
        raise ValueError(f"flash must be 'auto', True or False, not '{flash}'")
    if choice is None:
        return not (device.split(':')[0] == 'cpu' and dtype == 'bfloat16')
    return choice


def resolve(device='auto', dtype='auto', compile='auto', flash='auto', local_rank=None):
    """(device, dtype, compile, flash) for this machine, each 'auto' replaced by its choice: the
    device made current (under torchrun each process its GPU, local_rank), then the best precision,
    compile and attention path for it. A ValueError names a setting the machine cannot honour."""
    device = use_device(pick_device(device), local_rank)
    dtype = pick_dtype(dtype, device)
    return device, dtype, pick_compile(compile, device), pick_flash(flash, device, dtype)


def compile_checked(model, batch, ctx, log=print, backend='inductor'):
    """torch.compile(model), tried on one forward and backward of batch (x, y), which is when
    compiling happens: the compiled model, or, where that fails (a compiler or Triton missing, a GPU
    it does not support), model itself after one line saying why. The CPU's random state is put back
    and the gradients dropped, so the run is the one it would have been."""
    compiled = torch.compile(model, backend=backend)
    try:
        with torch.random.fork_rng(devices=[]), ctx:
            _, loss = compiled(*batch)
            loss.backward()
    except Exception as e:
        e = getattr(e, 'inner_exception', None) or e  # BackendCompilerFailed wraps the compiler's
        first_line = (str(e).strip().splitlines() or [''])[0][:200]
        log(f"torch.compile failed ({type(e).__name__}: {first_line}): training without it "
            f"(--compile=False)")
        torch._dynamo.reset()
        compiled = model
    for p in model.parameters():
        p.grad = None
    return compiled


def fail_together(message, device, ddp):
    """Every process calls it; if one has a message (the others None), it is said and all stop,
    together. Said before the others learn of it: torchrun stops the rest as soon as one exits."""
    if message is not None:
        print(f"error: {message}", file=sys.stderr, flush=True)
    flag = torch.tensor(float(message is not None), device=device)
    if ddp:
        torch.distributed.all_reduce(flag)
    if flag.item() > 0:
        sys.exit(1)


class StopSignals:
    """SIGTERM (a cluster preempting the job, `kill`) and SIGINT (Ctrl-C), from now on: each asks
    train.py to stop at this step, with a checkpoint, and name says which one did (None: none yet);
    a second one stops at once, without a checkpoint (KeyboardInterrupt)."""

    def __init__(self, log=print):
        self.name, self.log = None, log
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.name is not None:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        self.log(f"{self.name}: stopping at this step, with a checkpoint")


# Dense (not 2:4 sparse) bf16 tensor-core peaks from NVIDIA's datasheets, in FLOP/s; the first name
# that appears as whole words in torch.cuda.get_device_name wins, so the longer names come first.
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
