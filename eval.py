"""
How good a model is, in numbers others use: bits per byte on any text, the loss of a dataset's val
split, and HellaSwag zero-shot accuracy (docs/eval.md has the commands and the figures to expect):

    python eval.py --out_dir=out-shakespeare-char-cpu --task=bpb --input=held_out.txt
    python eval.py --init_from=gpt2 --task=hellaswag         # downloads hellaswag_val.jsonl once
    python eval.py --out_dir=out-shakespeare --task=val      # the val split of the run's dataset
    torchrun --standalone --nproc_per_node=8 eval.py --init_from=gpt2-xl --task=hellaswag

Bits per byte divides the loss by the text's UTF-8 bytes instead of its tokens, so a character model
and a BPE model scored on the same text give comparable numbers. The last line of output is
machine-readable:

    bpb: 1.2340 (loss 2.3450 per token, 123,456 bytes, 45,678 tokens)
    hellaswag: acc 0.2859 acc_norm 0.2955 (10042 examples)

Under torchrun the work is shared out and the sums added up: the same numbers as one process.
"""

import collections
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

import configurator
from checkpoint import load_model
from devices import resolve
from scoring import HELLASWAG_ITEMS, HellaSwag, bits_per_byte, score_sums
from tokenizer import DATA_DIR, find_files, load_meta

# -----------------------------------------------------------------------------
# settings
task = 'bpb'  # 'bpb' (any text: --input) | 'hellaswag' (zero-shot) | 'val' (a dataset's val split)
init_from = 'resume'  # 'resume' (out_dir) | a run folder | FILE.pt | 'gpt2'..'gpt2-xl' | HF folder
out_dir = 'out'  # folder holding ckpt.pt
ckpt_name = 'ckpt.pt'  # 'ckpt.pt' (the best model) | 'last.pt' (the latest state of training)
input = ''  # bpb: a UTF-8 text, folder or glob; hellaswag: the .jsonl ('' = data/hellaswag/)
dataset = ''  # val: data/<dataset> ('' = the one the checkpoint was trained on)
max_items = 0  # hellaswag: score the first max_items items only (0 = all 10,042)
block_size = 0  # 0: the model's context length; a smaller one crops the model to it
batch_size = 8  # windows per forward pass (bpb, val); HellaSwag scores one item's 4 endings a pass
seed = 1337  # nothing here is random; seeded all the same
device = (  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps' (under torchrun: each process its own GPU)
    'auto')
dtype = 'auto'  # 'auto' (bf16 or fp16 where the device has it) | 'float32' | 'bfloat16' | 'float16'
# -----------------------------------------------------------------------------
configurator.configure(globals())

# processes, device, precision
ddp = 'RANK' in os.environ  # torchrun: rank r of world takes every world-th batch or item
rank, local_rank, world = ((int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
                           if ddp else (0, 0, 1))
master = rank == 0
# the others found it too: they exit quietly
fail = configurator.fail if master else (lambda message: sys.exit(1))
log = print if master else (lambda *args, **kwargs: None)
if task not in ('bpb', 'hellaswag', 'val'):
    fail(f"task must be 'bpb', 'hellaswag' or 'val', not '{task}'")
if batch_size < 1 or block_size < 0 or max_items < 0:
    fail(f"batch_size must be at least 1 ({batch_size}), block_size and max_items at least 0 "
         f"({block_size}, {max_items})")
try:  # 'auto' for this machine; under torchrun each process takes its own GPU (devices.py)
    device, dtype, _, _ = resolve(device, dtype, local_rank=local_rank if ddp else None)
except ValueError as e:
    fail(e)
if ddp:  # NCCL between GPUs, else Gloo
    dist.init_process_group(backend='nccl' if device.startswith('cuda') and
                            dist.is_nccl_available() else 'gloo')
torch.manual_seed(seed)
# mixed precision: matmuls in bfloat16 or float16 where the device has them
ctx = (nullcontext() if dtype == 'float32'
       else torch.autocast(device.split(':')[0], getattr(torch, dtype)))

# the model, and the tokenizer of the data it was trained on (GPT-2's BPE for GPT-2's weights)
try:
    # (a Hugging Face folder's weights in bfloat16 where the matmuls run in it: half the memory)
    model, tok, checkpoint = load_model(out_dir if init_from == 'resume' else init_from, device,
                                        ckpt_name, block_size,
                                        'bfloat16' if dtype == 'bfloat16' else 'float32')
except (ValueError, ImportError) as e:
    fail(e)
block_size = model.config.block_size
kind = tok.spec['type']
tokenizer_name = {'gpt2': "GPT-2's BPE", 'char': f"characters ({tok.n_vocab})"}.get(
    kind, f"{tok.spec.get('file', 'tokenizer.json')} ({tok.n_vocab:,} tokens)")
log(f"{model.get_num_params() / 1e6:.2f}M parameters, block_size {block_size}, "
    f"tokenizer {tokenizer_name}; device {device}, dtype {dtype}, {world} process(es)")


def progress(steps):
    """A tqdm progress bar on the master (on stderr), when tqdm is installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return steps
    return tqdm(steps, disable=not master, unit=' batches' if task != 'hellaswag' else ' items',
                smoothing=0.1)


def windows(n, stride):
    """(start, end, skip) of each window over n ids: inputs ids[start:end], targets
    ids[start+1:end+1] of which the first skip were scored by the window before. Windows of
    block_size start every stride ids: with stride = block_size // 2, every target after the first
    window's has at least half a window of context (the first window's have all there is); with
    stride = block_size, each target is scored once."""
    stride = max(1, stride)
    out, scored, start = [], 0, 0  # targets ids[1..scored] are done
    while scored < n - 1:
        end = min(start + block_size, n - 1)
        out.append((start, end, scored - start))
        scored, start = end, start + stride
    return out


def score_windows(ids, spans):
    """[loss sum, targets, loss of text targets, their bytes] over the windows spans of ids, summed
    over processes: batches of batch_size windows, rank r taking batches r, r + world, ...
    (float64 sums)."""
    token_bytes = torch.tensor(tok.token_bytes(), device=device)
    sums = torch.zeros(4, dtype=torch.float64)
    for b in progress(range(rank * batch_size, len(spans), world * batch_size)):
        batch = spans[b:b + batch_size]
        # (B, T), padded with 0, whose targets (-1) are ignored
        x = torch.zeros((len(batch), block_size), dtype=torch.long)
        y = torch.full((len(batch), block_size), -1, dtype=torch.long)
        for i, (start, end, skip) in enumerate(batch):
            x[i, :end - start] = torch.from_numpy(ids[start:end].astype(np.int64))
            y[i, skip:end - start] = torch.from_numpy(
                ids[start + 1 + skip:end + 1].astype(np.int64))
        x, y = x.to(device), y.to(device)
        with torch.no_grad(), ctx:
            logits, _ = model(x, y)  # (B, T, vocab_size)
        sums += score_sums(logits, y, token_bytes).double().cpu()
    if ddp:
        sums = sums.to(device)  # NCCL reduces GPU tensors
        dist.all_reduce(sums)
    return sums.cpu().tolist()


def report_bpb(sums):
    loss_sum, n_targets, nats, n_bytes = sums
    log(f"bpb: {bits_per_byte(nats, n_bytes):.4f} (loss {loss_sum / n_targets:.4f} per token, "
        f"{int(n_bytes):,} bytes, {int(n_targets):,} tokens)")


# -----------------------------------------------------------------------------
if task == 'bpb':
    # every file is a document, scored from its first token on: each starts after the end-of-text
    # token where the tokenizer has one (documents follow it in training), else after a newline. The
    # start is encoded alone, so it never merges with the text: every byte of the text is scored,
    # whatever the tokenizer.
    if not input:
        fail("task=bpb needs the text to score: --input=FILE (a UTF-8 text, a folder of .txt "
             "files, or a glob)")
    try:
        files = find_files(input)
    except ValueError as e:
        fail(e)
    texts = []
    for path in files:
        try:
            with open(path, encoding='utf-8') as f:
                texts.append((path, f.read()))
        except UnicodeDecodeError as e:
            fail(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})")
    if not any(text for _, text in texts):
        fail(f"--input '{input}' holds no text: {len(files)} empty file(s)")
    # refused, not skipped: bits per byte over part of the text would compare with nothing
    if kind == 'char':
        unknown = collections.Counter(c for _, text in texts for c in text if c not in tok.stoi)
        if unknown:
            fail(f"--input has {sum(unknown.values()):,} characters ({len(unknown)} distinct: "
                 f"{' '.join(repr(c) for c, _ in unknown.most_common(20))}"
                 f"{' ...' if len(unknown) > 20 else ''}) that this character model never saw "
                 f"(it knows {tok.n_vocab}): it cannot score them, and bits per byte without them "
                 f"would compare with no other model; remove them from the text")
    try:
        start_ids = [tok.eot] if tok.eot is not None else tok.encode('\n')
    except ValueError:
        # a character model that never saw a newline: its first token is context only
        start_ids = []
    # every file's ids, one after the other; windows never cross from one to the next
    ids, spans = [], []
    for path, text in texts:
        doc = start_ids + tok.encode(text)
        spans += [(len(ids) + start, len(ids) + end, skip)
                  for start, end, skip in windows(len(doc), block_size // 2)]
        ids += doc
    n_bytes = sum(len(text.encode('utf-8')) for _, text in texts)
    log(f"{len(files)} file(s), {n_bytes:,} bytes, {len(ids):,} tokens; windows of {block_size} "
        f"tokens every {block_size // 2}: each token is scored once, with half a window of context "
        f"or more (or all the text before it)")
    sums = score_windows(np.array(ids, dtype=np.int64), spans)
    report_bpb(sums)

elif task == 'val':
    name = dataset or (checkpoint or {}).get('config', {}).get('dataset')
    if not name:
        fail("task=val for GPT-2's weights needs the dataset: --dataset=NAME "
             "(data/NAME/val.bin)")
    data_dir = os.path.join(DATA_DIR, name)
    try:
        meta = load_meta(data_dir)
    except ValueError as e:
        fail(e)
    if meta['tokenizer'] != tok.spec:
        fail(f"data/{name} is tokenized as '{meta['tokenizer']['type']}', the model reads "
             f"'{kind}': evaluate on a dataset of its tokenizer, or use --task=bpb on the text")
    ids = np.memmap(os.path.join(data_dir, 'val.bin'), dtype=meta['dtype'], mode='r')
    if len(ids) < 2:
        fail(f"data/{name}/val.bin holds {len(ids)} token(s): nothing to score")
    log(f"data/{name}/val.bin: {len(ids):,} tokens in windows of {block_size}, "
        f"each target scored once")
    report_bpb(score_windows(ids, windows(len(ids), block_size)))

else:  # hellaswag
    try:  # downloaded once, when missing (on every process: they race harmlessly)
        hellaswag = HellaSwag(tok, max_items, input)
        if kind != 'gpt2':  # any tokenizer works; the published figures are for GPT-2's
            log(f"note: this model reads {tokenizer_name}, not GPT-2's BPE: its numbers compare "
                f"with other models of the same tokenizer, not with the published GPT-2 figures")
        if len(hellaswag.items) < HELLASWAG_ITEMS and not max_items:
            log(f"note: {hellaswag.path} has {len(hellaswag.items):,} items, not the validation "
                f"split's {HELLASWAG_ITEMS:,}")
        n, acc, acc_norm = hellaswag.score(model, device, ctx, rank, world, progress)
    except ValueError as e:
        fail(e)
    where = '' if kind == 'gpt2' else f", tokenizer {kind}"
    log(f"hellaswag: acc {acc:.4f} acc_norm {acc_norm:.4f} ({n} examples{where})")

if ddp:  # every process leaves together
    dist.barrier()
    dist.destroy_process_group()
