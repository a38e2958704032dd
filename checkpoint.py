"""
Where a model comes from and where it goes: checkpoints written and read (whole or not at all), one run
per out_dir (RunLock, hold_out_dir), the model a training run starts from (train_model: init_from's
scratch, resume, a .pt file or GPT-2's weights; resume_optimizer), and one call that gives a ready model
with its tokenizer:

    from checkpoint import load_model
    model, tok, ckpt = load_model('out-shakespeare-char-cpu', device='cpu')   # a run's folder
    model, tok, ckpt = load_model('gpt2-xl', device='cuda')                   # OpenAI's GPT-2 (ckpt is None)

train.py, sample.py, chat.py, eval.py and export_hf.py use it; model.py knows nothing of files;
devices.py says where a model runs; hf_gpt2.py reads GPT-2's Hugging Face folders.
A checkpoint is one torch.save dict with nanoGPT's keys (model, optimizer, model_args, iter_num,
best_val_loss, config) and what exact resumption adds (scaler, rng_state, cuda_rng_state). It holds
plain tensors and values only, so it loads with weights_only=True and loading never runs code.
"""

import atexit
import dataclasses
import os
import shutil
import socket
import time
import zipfile
from contextlib import contextmanager, suppress

try:
    import fcntl  # POSIX: Linux and macOS
except ImportError:  # Windows: runs are not locked
    fcntl = None

import torch

from devices import fail_together, human_bytes
from downloads import GPT2_SIZES
from hf_gpt2 import from_pretrained
from model import GPT, GPTConfig
from tokenizer import DATA_DIR, DataError, gpt2_tokenizer, load_meta, load_tokenizer

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
    (copy-on-write: training changes memory, never the file), which train.py avoids (mmap=False). So never
    torch.save over a file still mapped (truncating it kills the process with SIGBUS): save_checkpoint writes a
    new file and renames it, which leaves the mapped one whole."""
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
    with shapes_only():  # no memory, no time spent on an initialisation overwritten next
        model = GPT(GPTConfig(**{**checkpoint['model_args'], **checkpoint.get('arch', {}), **overrides}))
    model.load_state_dict(state_dict, assign=True)
    model.transformer.wte.weight = model.lm_head.weight  # tied again: assign gave each name its own Parameter
    model.to(device)
    return model, checkpoint  # without 'model': its tensors are the model's now


@contextmanager
def shapes_only():
    """Modules built inside are on the 'meta' device (shapes, no memory) and draw no random initial weights:
    torch.nn.init.normal_ on a meta tensor imports torch._dynamo, 1.1 s of sample.py's 2.8 s start-up here
    (torch 2.13), for numbers that load_state_dict replaces anyway."""
    normal = torch.nn.init.normal_  # (a real tensor, in another thread meanwhile, is still drawn)
    # (named tensor: under a device context, init.normal_ passes itself on with tensor= as a keyword)
    torch.nn.init.normal_ = lambda tensor, *args, **kwargs: tensor if tensor.is_meta else normal(tensor, *args, **kwargs)
    try:
        with torch.device('meta'):
            yield
    finally:
        torch.nn.init.normal_ = normal


# a resumed run keeps these (a model from GPT-2's weights has GPT-2's shape, whatever the settings say)
RESUME_SHAPE = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'rope', 'rmsnorm', 'swiglu', 'n_kv_head', 'qk_norm')


def check_resume(checkpoint, model, settings, vocab_sizes, config):
    """The settings a resumed run may change, as lines to say ('max_iters: 12 in the checkpoint, now 24'); a
    ValueError for one it may not: the vocabulary (vocab_sizes: those the data allows) and, unless the weights
    came from GPT-2, the shape (RESUME_SHAPE; model holds the checkpoint's, settings today's)."""
    saved = checkpoint['model_args']
    if saved['vocab_size'] not in vocab_sizes:
        raise ValueError(f"the checkpoint has vocab_size = {saved['vocab_size']}, the settings say vocab_size = "
                         f"{vocab_sizes[0]}: resume on the dataset it was trained on "
                         f"(--dataset={checkpoint['config'].get('dataset')})")
    if checkpoint['config'].get('init_from', 'scratch') in ('scratch', 'resume'):
        for k in RESUME_SHAPE:
            have = getattr(model.config, k)  # saved[k], or the default for a checkpoint older than the key
            if have != settings[k]:
                raise ValueError(f"the checkpoint has {k} = {have}, the settings say {k} = {settings[k]}: "
                                 f"give the settings it was trained with (the same config file)")
    fixed = set(settings) | {'init_from', 'device', 'dtype'}
    return [f"{k}: {v} in the checkpoint, now {config[k]}" for k, v in checkpoint['config'].items()
            if k in config and k not in fixed and v != config[k]]


def rekey(optim_sd, key):
    """optim_sd with each parameter k renamed key[k]: a checkpoint numbers them as torch.optim does, FSDP names them."""
    return dict(state={key[k]: s for k, s in optim_sd['state'].items()},
                param_groups=[dict(g, params=[key[k] for k in g['params']]) for g in optim_sd['param_groups']])


def full_state(model, optimizer, sharded):
    """(model's state, optimizer's state) as whole tensors, the optimizer's numbered as torch.optim numbers them,
    so that any run reads them (one process, DDP, FSDP, nanoGPT). sharded (FSDP2): every process calls it, the
    shards are gathered to the master's CPU (cpu_offload), and the others get empty dicts."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:  # only the master has them
        return model_sd, optim_sd
    name_to_number = {n: i for i, n in enumerate(n for g in optim_sd['param_groups'] for n in g['params'])}
    return model_sd, rekey(optim_sd, name_to_number)


def restore_optimizer(model, optimizer, optim_sd, sharded):
    """A checkpoint's optimizer state (numbered, as full_state writes it) into optimizer, whose settings stay
    today's: the learning rate, the betas, the fused kernel (this machine's choice)."""
    today = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
    if sharded:  # FSDP names the parameters: each process takes its shard of the full state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        names = {p: n for n, p in model.named_parameters()}
        number_to_name = [names[p] for g in optimizer.param_groups for p in g['params']]
        set_optimizer_state_dict(model, optimizer, rekey(optim_sd, number_to_name),
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(optim_sd)
    for group, settings in zip(optimizer.param_groups, today):
        group.update(settings)


def resume_optimizer(checkpoint, config, model, optimizer, scaler, sharded, log=print):
    """A resumed run's optimizer state (Adam's moments, and Muon's) and float16's loss scale (scaler), from
    checkpoint; their settings stay today's. A checkpoint of another optimizer than config's: it starts afresh."""
    optim_sd = checkpoint.get('optimizer') or {}  # none, or no state (saved before the first update): the fresh one
    if checkpoint['config'].get('optimizer', 'adamw') != config['optimizer']:
        log(f"optimizer {checkpoint['config'].get('optimizer', 'adamw')} in the checkpoint, now {config['optimizer']}: "
            f"its state starts afresh")
        optim_sd = {}
    if optim_sd.get('state'):  # its settings (learning rate, betas, the fused kernel) stay today's
        restore_optimizer(model, optimizer, optim_sd, sharded)
    if scaler.is_enabled() and checkpoint.get('scaler'):  # float16 on both runs: keep the loss scale it found
        scaler.load_state_dict(checkpoint['scaler'])


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


def hold_out_dir(out_dir, master, device, ddp, log=print):
    """train.py's out_dir, made if new, and held by this run until it exits: the master takes its RunLock
    (torchrun's other processes share it). A ValueError when it cannot be written; when another run holds it,
    every process stops (devices.fail_together). Returns the lock (None on the other processes)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(13, 'Permission denied')
    except OSError as e:
        raise ValueError(f"cannot write to out_dir '{out_dir}' ({e.strerror}): choose another with --out_dir=PATH") from None
    lock = busy = None
    try:
        lock = RunLock(out_dir) if master else None
    except ValueError as e:
        busy = e
    fail_together(busy, device, ddp)
    if lock is not None:
        atexit.register(lock.release)
        if lock.notice:  # a killed run's lock taken over, or none possible here
            log(lock.notice)
    return lock


# -----------------------------------------------------------------------------
# a training run's model: a base model fitted to a chat dataset, and init_from


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


def train_model(init_from, out_dir, model_args, meta, config, device, sharded=False, log=print):
    """(model, model_args, checkpoint) for train.py, from init_from:
    - 'scratch': a new GPT of model_args (the settings);
    - 'resume': out_dir's last.pt, else its ckpt.pt (nanoGPT's folders), whose shape and vocabulary must be the
      settings' (check_resume: what else changed is logged); config['init_from'] keeps where its weights came from,
      and the random state is the checkpoint's (torch's, and CUDA's on a GPU);
    - FILE.pt: another run's weights and shape, to finetune (iteration 0, a new optimizer);
    - 'gpt2'..'gpt2-xl' or a Hugging Face folder: GPT-2's weights, for data in GPT-2's BPE (meta).
    The last two are cropped to model_args' block_size if it is smaller, and grow their vocabulary for a chat
    dataset (grow_for_chat). model_args comes back as the model's own GPTConfig fields (the settings', from
    scratch), for the checkpoint; checkpoint is resume's (its iteration, random and optimizer state), else None.
    sharded (FSDP): a resumed model stays on the CPU, for fully_shard. A ValueError (an ImportError: the pip
    install a Hugging Face folder needs) says in one line what is wrong."""
    dropout, flash, block_size, vocab_size = (model_args[k] for k in ('dropout', 'flash', 'block_size', 'vocab_size'))
    if init_from == 'scratch':
        log(f"a new model from scratch, vocab_size {vocab_size}")
        return GPT(GPTConfig(**model_args)), model_args, None
    if init_from == 'resume':
        # last.pt is the latest state; a folder written by nanoGPT (or with last.pt deleted) has ckpt.pt
        path = next((p for p in (os.path.join(out_dir, f) for f in ('last.pt', 'ckpt.pt')) if os.path.isfile(p)), None)
        if path is None:
            raise ValueError(f"no checkpoint to resume in {out_dir}: train with --init_from=scratch first, or fix --out_dir")
        log(f"resuming from {path}")
        # dropout and the attention path may change on resume; the weights' shapes may not
        model, checkpoint = load_checkpoint(path, 'cpu' if sharded else device, dropout=dropout, flash=flash,
                                            mmap=sharded or device.split(':')[0] != 'cpu')
        # its shape and vocabulary stay; what may change is allowed, and said
        changes = check_resume(checkpoint, model, model_args, (vocab_size, meta['vocab_size']), config)
        log(''.join(f"  {change}\n" for change in changes), end='')
        if checkpoint['config'].get('init_from', 'scratch') not in ('scratch', 'resume'):
            config['init_from'] = checkpoint['config']['init_from']  # GPT-2's weights: where they came from, kept
        # dropout continues as if never stopped (a CPU tensor, whatever map_location did)
        if 'rng_state' in checkpoint:
            torch.set_rng_state(checkpoint['rng_state'].cpu())
        if device.startswith('cuda') and 'cuda_rng_state' in checkpoint:
            torch.cuda.set_rng_state(checkpoint['cuda_rng_state'].cpu())
        return model, dataclasses.asdict(model.config), checkpoint  # with today's dropout, flash
    if init_from.endswith('.pt'):  # another run's checkpoint, to finetune: its weights and shape, a fresh optimizer
        log(f"initialising from {init_from} (its weights; iteration 0, a new optimizer)")
        model, base = load_checkpoint(init_from, device, dropout=dropout, flash=flash)
    elif init_from.startswith('gpt2') or os.path.isdir(init_from):  # GPT-2's weights: from the hub, or an HF folder
        if meta['tokenizer']['type'] != 'gpt2':
            raise ValueError(f"init_from={init_from} needs data in GPT-2's BPE, but data/{config['dataset']} is "
                             f"tokenized as '{meta['tokenizer']['type']}': prepare it with --tokenizer=gpt2")
        log(f"initialising from GPT-2's weights: {init_from}")
        model, base = from_pretrained(init_from, dict(dropout=dropout, flash=flash)), None
    else:
        raise ValueError(f"init_from must be 'scratch', 'resume', 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a "
                         f"Hugging Face folder, not '{init_from}'")
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)  # GPT-2 has 1024 positions; fewer train faster
    if 'chat' in meta:  # ids the base never learned: the markers, new characters
        try:
            known, added = grow_for_chat(model, base, meta, vocab_size)
        except (ValueError, DataError) as e:
            raise ValueError(f"{e}: prepare the conversations with --tokenizer=data/<the dataset the model learned>") from None
        log(f"the embedding and the tied lm_head grow by {added} rows to {vocab_size:,}; ids {known:,}.."
            f"{meta['vocab_size'] - 1:,} (the chat template's tokens, new characters) start at the mean of the others")
    return model, dataclasses.asdict(model.config), None  # GPT-2's shape (vocab 50257, tanh GELU), for the checkpoint


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


def load_model(source, device='cpu', ckpt_name='ckpt.pt', block_size=0, **overrides):
    """(model, tokenizer, checkpoint) from source, in eval mode on device:
    - a run's out_dir (train.py's or nanoGPT's): its ckpt_name, with the tokenizer of its dataset;
    - a checkpoint file (path/to/last.pt), likewise;
    - 'gpt2' ... 'gpt2-xl' or a Hugging Face folder (config.json): GPT-2's weights and BPE (checkpoint None).
    block_size: 0 keeps the model's context, a smaller one crops it (fewer positions: faster, and what a model
    trained shorter saw). overrides: dropout, flash (eval mode turns dropout off anyway). A ValueError or
    DataError says in one line what is wrong; an ImportError names the pip install a Hugging Face folder needs."""
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
    if block_size > model.config.block_size:
        raise ValueError(f"block_size {block_size} is larger than the model's {model.config.block_size}: it has no "
                         f"position embeddings beyond that; use at most {model.config.block_size} (0 keeps it)")
    if 0 < block_size < model.config.block_size:
        model.crop_block_size(block_size)
    model.to(device)
    model.eval()
    return model, tok, checkpoint
