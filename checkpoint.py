"""
Where a model comes from and where it goes: checkpoints written whole or not at all, one run per
out_dir (RunLock), resuming, a base model fitted to a dataset's vocabulary, and one call that gives
a ready model with its tokenizer from wherever it is:

    from checkpoint import load_model
    model, tok, ckpt = load_model('out-shakespeare-char-cpu', device='cpu')  # a run's folder
    model, tok, ckpt = load_model('gpt2-xl', device='cuda')                  # GPT-2 (ckpt None)
    model, tok, ckpt = load_model('path/to/SmolLM2-135M', device='cpu')      # a Hugging Face folder

A checkpoint is one torch.save dict with nanoGPT's keys (model, optimizer, model_args, iter_num,
best_val_loss, config) and what exact resumption adds (scaler, rng_state). It holds plain tensors
and values only, so it loads with weights_only=True and loading never runs code (docs/design.md,
Checkpoints). model.py knows nothing of files; hf_models.py reads and writes Hugging Face folders.
"""

import atexit
import math
import os
import shutil
import socket
import time
import zipfile
from contextlib import suppress

try:
    import fcntl  # POSIX: Linux and macOS
except ImportError:  # Windows: runs are not locked
    fcntl = None

import torch

from devices import fail_together
from downloads import download_model, is_hub_model
from hf_models import from_pretrained, hf_tokenizer_of
from lora import adapt, is_lora, load_lora_state_dict, lora_state_dict, merge_lora
from memory import human_bytes
from model import GPT, GPTConfig
from tokenizer import DATA_DIR, DataError, gpt2_tokenizer, load_meta, load_tokenizer

# -----------------------------------------------------------------------------
# writing


class CheckpointError(Exception):
    """A checkpoint could not be written (no space, an I/O error); the old one is untouched."""


def tensor_bytes(obj):
    """Bytes of the tensors in obj (dicts and lists of them): about a checkpoint's size on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(map(tensor_bytes, obj.values()))
    return sum(map(tensor_bytes, obj)) if isinstance(obj, (list, tuple)) else 0


def save_checkpoint(checkpoint, path):
    """torch.save to a temporary file, pushed to the disk, then renamed over path: whenever the
    machine dies, path holds a whole checkpoint (the old one or the new one). An error while
    writing (a full disk, an I/O error) removes the temporary file and is a CheckpointError saying
    how much space the folder has and the checkpoint needs; path is still the old checkpoint."""
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
            e = e.__context__  # torch.save's RuntimeError hides the OSError that caused it
        why = e.strerror if isinstance(e, OSError) and e.strerror else \
            f"{type(e).__name__}: {e}".splitlines()[0]
        folder = os.path.dirname(os.path.abspath(path))
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
        need = human_bytes(tensor_bytes(checkpoint))
        raise CheckpointError(f"cannot write {path} ({why}); {folder} has {human_bytes(free)} "
                              f"free, the checkpoint needs {need}") from None


def full_state(model, optimizer, sharded):
    """(model's state, optimizer's state) as whole tensors, the optimizer's numbered as torch.optim
    numbers them, so that any run reads them (one process, DDP, FSDP, nanoGPT). sharded (FSDP2):
    every process calls it, the shards are gathered to the master's CPU, the others get {}."""
    if not sharded:  # LoRA: the adapters alone (lora.py)
        model_sd = lora_state_dict(model) if is_lora(model) else model.state_dict()
        return model_sd, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    if torch.distributed.get_rank() != 0:  # only the master has them
        return model_sd, optim_sd
    names = [n for g in optim_sd['param_groups'] for n in g['params']]
    return model_sd, rekey(optim_sd, {n: i for i, n in enumerate(names)})


def save_run(model, optimizer, state, names, out_dir, sharded, master, device, ddp):
    """Write a checkpoint of model and optimizer (full_state) with the rest of the run's state (a
    dict holding model_args, the GPTConfig fields) to out_dir/name for each of names, each whole or
    not at all. Every process calls it; if a file cannot be written, all stop (fail_together) with
    one line saying what failed and which last.pt resumes. Returns the seconds it took."""
    model_sd, optim_sd = full_state(model, optimizer, sharded)  # under FSDP: the master's only
    error, t = None, time.perf_counter()
    if master:
        model_args, arch = split_model_args(state['model_args'])  # nanoGPT's keys, and ours
        checkpoint = dict(state, model=model_sd, optimizer=optim_sd, model_args=model_args,
                          arch=arch)
        try:
            for name in names:
                save_checkpoint(checkpoint, os.path.join(out_dir, name))
        except CheckpointError as e:
            last = os.path.join(out_dir, 'last.pt')
            resumable = None
            with suppress(Exception):  # the iteration of the last.pt on disk, which is whole
                resumable = torch.load(last, 'cpu', weights_only=True, mmap=True)['iter_num']
            error = f"{e}: stopped; " + (
                f"last.pt of iteration {resumable} is whole: make space and run the same command "
                f"with --init_from=resume" if resumable is not None else
                "this run has not saved a checkpoint yet: make space and start again")
    fail_together(error, device, ddp)  # no process goes on without the checkpoint
    return time.perf_counter() - t


# nanoGPT's GPTConfig has these fields only: a checkpoint's model_args holds exactly them, so that
# nanoGPT's sample.py and train.py read our files; the settings it lacks go in 'arch'
NANOGPT_MODEL_ARGS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout')


def split_model_args(args):
    """(model_args, arch) of GPTConfig's fields: nanoGPT's keys, and the rest (ours)."""
    return ({k: v for k, v in args.items() if k in NANOGPT_MODEL_ARGS},
            {k: v for k, v in args.items() if k not in NANOGPT_MODEL_ARGS})


# -----------------------------------------------------------------------------
# reading


def load_checkpoint(path, device, optimizer=True, mmap=True, **overrides):
    """Load a checkpoint of train.py (or nanoGPT) into a GPT on device: (model, checkpoint).
    optimizer=False drops the optimizer's state unread. overrides change settings that leave the
    weights alone (dropout, flash). mmap: the file is mapped, not read, so what is never used takes
    no memory; the model, built without GPT-2's initialisation, takes the file's tensors
    themselves (assign=True). Never torch.save over a file still mapped (save_checkpoint writes a
    new file and renames it, which leaves the mapped one whole)."""
    mmap = mmap and zipfile.is_zipfile(path)  # torch.save's format since PyTorch 1.6
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, not a checkpoint, or holding objects other than plain data
        first_line = (str(e).strip().splitlines() or [''])[0]
        raise ValueError(f"cannot load checkpoint {path} ({type(e).__name__}: "
                         f"{first_line})") from None
    if not isinstance(checkpoint, dict) or \
            not {'model', 'model_args', 'iter_num'} <= checkpoint.keys():
        raise ValueError(f"cannot load checkpoint {path}: it is not one written by train.py or "
                         f"nanoGPT (no 'model', 'model_args' and 'iter_num' in it)")
    if not optimizer:
        checkpoint.pop('optimizer', None)
    # a model saved after torch.compile has its names prefixed with '_orig_mod.'
    state_dict = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint.pop('model').items()}
    args = {**checkpoint['model_args'], **checkpoint.get('arch', {}), **overrides}
    if 'lora' in checkpoint:  # adapters only: the model is their base, with them
        model = with_adapters(checkpoint['lora'], GPTConfig(**args), state_dict)
        return model.to(device), checkpoint
    # on the CPU, not the 'meta' device (a meta tensor's normal_ imports all of torch._dynamo);
    # the draws of nn.Linear and nn.Embedding, overwritten next, leave the random state as it was
    with torch.random.fork_rng(devices=[]):
        model = GPT(GPTConfig(**args), init_weights=False)
    model.load_state_dict(state_dict, assign=True)
    if model.config.tie_embeddings:  # tied again: assign gave each name its own Parameter
        model.transformer.wte.weight = model.lm_head.weight
    model.to(device)
    return model, checkpoint  # without 'model': its tensors are the model's now


def with_adapters(lora, config, adapters):
    """The model of a LoRA checkpoint (lora: its 'lora' entry): the base it names, cropped and grown
    as its run did, with the adapters (and the rows of new tokens) it trained (lora.py)."""
    model, _, _ = load_model(lora['base'], 'cpu', tokenizer=False, dropout=config.dropout,
                             flash=config.flash)
    model.train()
    if config.block_size < model.config.block_size:
        model.crop_block_size(config.block_size)
    if lora['known'] < config.vocab_size:
        model.grow_vocab(config.vocab_size, lora['known'])
    settings = {k: v for k, v in lora.items() if k != 'fingerprint'}
    if not math.isclose(adapt(model, **settings)['fingerprint'], lora['fingerprint'], rel_tol=1e-9):
        raise ValueError(f"the base model of these adapters, {lora['base']}, has changed since "
                         f"they were trained: restore it, or train the adapters again")
    load_lora_state_dict(model, adapters)
    return model


def find_checkpoint(out_dir, ckpt_name='ckpt.pt'):
    """out_dir/ckpt_name; for ckpt.pt, out_dir/last.pt when a run stopped before its first
    evaluation; for 'resume', last.pt, else ckpt.pt (a folder written by nanoGPT)."""
    names = ['last.pt', 'ckpt.pt'] if ckpt_name == 'resume' else [ckpt_name]
    names += ['last.pt'] if ckpt_name == 'ckpt.pt' else []
    path = next((os.path.join(out_dir, n) for n in names
                 if os.path.isfile(os.path.join(out_dir, n))), None)
    if path is None and ckpt_name == 'resume':
        raise ValueError(f"no checkpoint to resume in {out_dir}: train with --init_from=scratch "
                         f"first, or fix --out_dir")
    if path is None:
        raise ValueError(f"no checkpoint at {os.path.join(out_dir, ckpt_name)}: train one first "
                         f"(python train.py ...), or fix --out_dir")
    if ckpt_name == 'ckpt.pt' and path.endswith('last.pt'):
        print(f"(no ckpt.pt yet: using {path})")
    return path


# a resumed run keeps these (a model from another's weights has their shape, whatever the settings)
RESUME_SHAPE = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'rope', 'rmsnorm', 'swiglu',
                'n_kv_head', 'qk_norm')


def check_resume(checkpoint, model, settings, vocab_sizes, config):
    """The settings a resumed run may change, as lines to say ('max_iters: 12 in the checkpoint,
    now 24'); a ValueError for one it may not: the vocabulary (vocab_sizes: those the data allows)
    and, unless the weights came from elsewhere, the shape (RESUME_SHAPE; model holds the
    checkpoint's, settings today's)."""
    saved = checkpoint['model_args']
    if saved['vocab_size'] not in vocab_sizes:
        raise ValueError(f"the checkpoint has vocab_size = {saved['vocab_size']}, the settings say "
                         f"vocab_size = {vocab_sizes[0]}: resume on the dataset it was trained on "
                         f"(--dataset={checkpoint['config'].get('dataset')})")
    if checkpoint['config'].get('init_from', 'scratch') in ('scratch', 'resume'):
        for k in RESUME_SHAPE:
            have = getattr(model.config, k)  # saved[k], or the default for an older checkpoint
            if have != settings[k]:
                raise ValueError(f"the checkpoint has {k} = {have}, the settings say {k} = "
                                 f"{settings[k]}: give the settings it was trained with (the same "
                                 f"config file)")
    for k in ('lora_rank', 'lora_targets'):  # LoRA's adapters have their shapes too
        was = checkpoint['config'].get(k, 0 if k == 'lora_rank' else config[k])
        if k in config and was != config[k]:
            raise ValueError(f"the checkpoint has {k} = {was}, the settings say {k} = {config[k]}: "
                             f"give the settings it was trained with (the same config file)")
    fixed = set(settings) | {'init_from', 'device', 'dtype'}
    return [f"{k}: {v} in the checkpoint, now {config[k]}" for k, v in checkpoint['config'].items()
            if k in config and k not in fixed and v != config[k]]


def resume_checkpoint(out_dir, device, settings, vocab_sizes, config, mmap=True, log=print):
    """(model, checkpoint) of a run to resume: out_dir's last.pt (ckpt.pt in nanoGPT's folders),
    built with today's dropout and attention path (settings), its shape checked against settings
    and what else changed logged (check_resume); config['init_from'] keeps where its weights came
    from, and torch's random state is the checkpoint's."""
    path = find_checkpoint(out_dir, 'resume')
    log(f"resuming from {path}")
    model, checkpoint = load_checkpoint(path, device, mmap=mmap, dropout=settings['dropout'],
                                        flash=settings['flash'])
    for change in check_resume(checkpoint, model, settings, vocab_sizes, config):
        log(f"  {change}")
    if checkpoint['config'].get('init_from', 'scratch') not in ('scratch', 'resume'):
        config['init_from'] = checkpoint['config']['init_from']  # GPT-2's weights, say: kept
    if 'rng_state' in checkpoint:  # a CPU tensor, whatever map_location did
        torch.set_rng_state(checkpoint['rng_state'].cpu())
    return model, checkpoint


def rekey(optim_sd, key):
    """optim_sd with each parameter k renamed key[k] (a checkpoint numbers them, FSDP names)."""
    return dict(state={key[k]: s for k, s in optim_sd['state'].items()},
                param_groups=[dict(g, params=[key[k] for k in g['params']])
                              for g in optim_sd['param_groups']])


def restore_optimizer(model, optimizer, optim_sd, sharded):
    """A checkpoint's optimizer state (numbered, as full_state writes it) into optimizer, whose
    settings stay today's: the learning rate, the betas, the fused kernel (this machine's)."""
    today = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
    if sharded:  # FSDP names the parameters: each process takes its shard of the full state
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)
        names = {p: n for n, p in model.named_parameters()}
        number_to_name = [names[p] for g in optimizer.param_groups for p in g['params']]
        set_optimizer_state_dict(model, optimizer, rekey(optim_sd, number_to_name),
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(optim_sd)
    for group, settings in zip(optimizer.param_groups, today):
        group.update(settings)


def resume_optimizer(checkpoint, config, model, optimizer, scaler, sharded, log=print):
    """A resumed run's optimizer state (Adam's moments, Muon's) and float16's loss scale; their
    settings stay today's. A checkpoint of another optimizer than config's: it starts afresh."""
    optim_sd = checkpoint.get('optimizer') or {}  # none, or saved before the first update
    was = checkpoint['config'].get('optimizer', 'adamw')
    if was != config['optimizer']:
        log(f"optimizer {was} in the checkpoint, now {config['optimizer']}: its state starts "
            f"afresh")
        optim_sd = {}
    if optim_sd.get('state'):
        restore_optimizer(model, optimizer, optim_sd, sharded)
    if scaler.is_enabled() and checkpoint.get('scaler'):  # float16 on both runs: keep its scale
        scaler.load_state_dict(checkpoint['scaler'])


# -----------------------------------------------------------------------------
# one run per out_dir


class RunLock:
    """out_dir/train.lock, held by one train.py while it runs, so that a second one on the same
    folder refuses instead of writing over the first's files. The lock is the kernel's (flock): a
    process that dies in any way (kill -9, a crash, a reboot) holds it no longer, so a resume after
    a crash takes it over and says whose it was. The file names the holder for the message. On a
    filesystem without locks (some network mounts) it warns and holds none."""

    def __init__(self, out_dir):
        self.path, self.fd, self.notice = os.path.join(out_dir, 'train.lock'), None, ''
        if fcntl is None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 1000).decode(errors='replace').strip() or \
                    'a process starting up'
                os.close(fd)
                raise ValueError(f"{out_dir} is in use by another train.py ({holder}): wait for it "
                                 f"to end or stop it, or give this run another --out_dir") from None
            except OSError as e:
                os.close(fd)
                self.notice = (f"warning: cannot lock {self.path} ({e.strerror}): a second run "
                               f"would go unnoticed")
                return
            with suppress(FileNotFoundError):  # released meanwhile (deleted): lock the new file
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            os.close(fd)
        self.fd, left_by = fd, os.read(fd, 1000).decode(errors='replace').strip()  # a dead run's
        if left_by:
            self.notice = (f"taking over {self.path} from a run that is no longer running "
                           f"({left_by})")
        os.ftruncate(fd, 0)
        since = time.strftime('%Y-%m-%d %H:%M:%S')
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n".encode(), 0)

    def release(self):
        if self.fd is not None:  # delete before unlocking: a run waiting opens a new file
            with suppress(OSError):
                os.remove(self.path)
            os.close(self.fd)
            self.fd = None


def hold_out_dir(out_dir, master, device, ddp, log=print):
    """train.py's out_dir, made if new, and held by this run until it exits (the master's RunLock).
    A ValueError when it cannot be written; when another run holds it, every process stops."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(13, 'Permission denied')
    except OSError as e:
        raise ValueError(f"cannot write to out_dir '{out_dir}' ({e.strerror}): choose another with "
                         f"--out_dir=PATH") from None
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


# -----------------------------------------------------------------------------
# one call: a ready model and its tokenizer, from wherever it is


def load_model(source, device='cpu', ckpt_name='ckpt.pt', block_size=0, dtype='float32',
               tokenizer=True, **overrides):
    """(model, tokenizer, checkpoint) from source, in eval mode on device:
    - a run's out_dir (train.py's or nanoGPT's): its ckpt_name, with its dataset's tokenizer;
    - a checkpoint file (path/to/last.pt), likewise;
    - a Hugging Face folder (GPT-2, Llama, Qwen3: hf_models.py), or a hub model ('gpt2'...'gpt2-xl',
      'HuggingFaceTB/SmolLM2-135M'), with its tokenizer.json (GPT-2's BPE for GPT-2's weights
      without one) and chat template; checkpoint None.
    block_size: 0 keeps the model's context, a smaller one crops it. dtype: a folder's weights in
    'bfloat16' take half the memory of 'float32' (to sample; training keeps float32).
    tokenizer=False: a checkpoint's model without its dataset's tokenizer (None), for which the
    data need not be here. overrides: dropout, flash. A ValueError or DataError says in one line
    what is wrong; an ImportError names a pip install."""
    if is_hub_model(source) or os.path.isfile(os.path.join(source, 'config.json')):
        folder = source if os.path.isdir(source) else download_model(source)
        model = from_pretrained(folder, device, getattr(torch, dtype), **overrides)
        tok = hf_tokenizer_of(folder) or gpt2_tokenizer()  # GPT-2's weights: its BPE
        if model.config.vocab_size < tok.n_vocab:
            raise ValueError(f"{source} has a vocabulary of {model.config.vocab_size:,} tokens, "
                             f"its tokenizer {tok.n_vocab:,}: the folder's files do not belong "
                             f"together")
        checkpoint = None
    else:
        path = source if os.path.isfile(source) else find_checkpoint(source, ckpt_name)
        model, checkpoint = load_checkpoint(path, device, optimizer=False, **overrides)
        merge_lora(model)  # a LoRA run's adapters folded into the weights they adapt
        dataset, tok = checkpoint.get('config', {}).get('dataset'), None
        if tokenizer:  # the tokenizer of the data the model learned
            if dataset is None:
                raise ValueError(f"{path} does not say which dataset it was trained on "
                                 f"(config['dataset'])")
            meta = load_meta(os.path.join(DATA_DIR, dataset))
            tok = load_tokenizer(meta, os.path.join(DATA_DIR, dataset))
            if meta['vocab_size'] > model.config.vocab_size:
                raise DataError(f"data/{dataset} now has a vocabulary of {meta['vocab_size']:,}, "
                                f"but the model was trained on {model.config.vocab_size:,}: "
                                f"prepare the dataset again as it was for this model")
    if block_size > model.config.block_size:
        raise ValueError(f"block_size {block_size} is larger than the model's "
                         f"{model.config.block_size}: it has no position embeddings beyond that; "
                         f"use at most {model.config.block_size} (0 keeps it)")
    if 0 < block_size < model.config.block_size:
        model.crop_block_size(block_size)
    model.to(device)
    model.eval()
    return model, tok, checkpoint


def fit_vocab(model, base_tok, tok, meta, vocab_size, log=print):
    """Fit a base model (whose tokenizer is base_tok) to a dataset (tok, meta): the data's ids must
    mean what the base's mean, and the ids the base never learned (a chat template's markers, new
    characters) get fresh rows (model.grow_vocab), the vocabulary growing to vocab_size if smaller.
    Returns the number of ids the base knew; a ValueError when the base learned another tokenizer,
    which growing cannot mend."""
    known = base_tok.n_vocab  # ids the base learned
    base = meta['chat']['base_vocab_size'] if 'chat' in meta else meta['vocab_size']  # the data's
    # the data's first `base` ids are a tokenizer's: it must be the model's (compared id by id)
    same = base <= known <= tok.n_vocab and \
        all(base_tok.piece(i) == tok.piece(i) for i in range(known))
    if not same:
        raise ValueError(f"the model knows {known:,} ids, but the data's extend another tokenizer "
                         f"of {base:,}: its vocabulary cannot be grown to fit another tokenizer; "
                         f"prepare the data with --tokenizer=data/<the dataset the model learned> "
                         f"(or the model's folder)")
    if known < tok.n_vocab:  # the data has ids the base never learned
        added = model.grow_vocab(vocab_size, known)
        log(f"the embedding and the lm_head grow by {added} rows to {model.config.vocab_size:,}; "
            f"ids {known:,}..{tok.n_vocab - 1:,} (the chat template's tokens, new characters) "
            f"start at the mean of the others")
    return known
