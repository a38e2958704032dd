"""
How well a model predicts text, in the numbers others quote: the loss of each target, bits per byte,
and HellaSwag's zero-shot accuracy. train.py logs them at each evaluation; eval.py reports them on
any text, a dataset's val split, or HellaSwag.

    token_bytes = torch.tensor(tok.token_bytes(), device=device)  # UTF-8 bytes per id (tokenizer)
    logits, _ = model(x, y)                                        # (B, T, vocab_size)
    loss_sum, n_targets, nats, n_bytes = score_sums(logits, y, token_bytes).tolist()
    bits_per_byte(nats, n_bytes)

Bits per byte (nanochat's val_bpb) compares any two models on the same text, whatever their
tokenizers: a loss per token does not, since a BPE token holds ~4 characters and a character
model's token one.
"""

import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from downloads import download
from tokenizer import DATA_DIR, DataError

# -----------------------------------------------------------------------------
# losses and bits per byte


def token_losses(logits, targets):
    """(B, T) cross-entropy of each target in nats, float32; 0 where the target is -1 (ignored).
    logits (B, T, V) as the model's forward returns them with targets."""
    B, T, V = logits.shape
    return F.cross_entropy(logits.float().view(B * T, V), targets.reshape(B * T), ignore_index=-1,
                           reduction='none').view(B, T)


def score_sums(logits, targets, token_bytes):
    """(4,) float32 tensor of sums over a batch: the loss of every target, the number of targets,
    the loss of the targets that are text, their UTF-8 bytes. A special token (0 bytes: end-of-text,
    a chat marker) is a target but no text; an ignored target (-1) is neither. token_bytes: (vocab,)
    bytes per id, on the logits' device."""
    losses = token_losses(logits, targets)  # (B, T)
    counted = targets >= 0  # (B, T)
    n_bytes = token_bytes[targets.clamp(min=0)] * counted  # (B, T), 0 for ignored targets
    text = n_bytes > 0
    return torch.stack([losses.sum(), counted.sum().float(), (losses * text).sum(),
                        n_bytes.sum().float()])


def bits_per_byte(nats, n_bytes):
    """nats of loss over n_bytes bytes of text, in bits per byte: nats / (ln 2 * bytes)
    (nanochat's definition)."""
    return nats / (math.log(2) * n_bytes) if n_bytes else float('nan')


# -----------------------------------------------------------------------------
# HellaSwag (Zellers et al. 2019, arxiv.org/abs/1905.07830): a context, four endings, one of them
# right. Zero-shot as build-nanogpt's hellaswag.py scores it ("completion style"): each ending is
# the continuation of the context; acc picks the ending of the lowest summed loss, acc_norm the
# lowest loss per ending token.

HELLASWAG_URL = 'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'
HELLASWAG_FILE = os.path.join(DATA_DIR, 'hellaswag', 'hellaswag_val.jsonl')
HELLASWAG_ITEMS = 10042  # in the validation split


def hellaswag_file(path=''):
    """path, or the validation split at HELLASWAG_FILE, downloaded from its GitHub
    home when missing."""
    if path:
        if not os.path.isfile(path):
            raise DataError(f"HellaSwag file '{path}' not found")
        return path
    if not os.path.isfile(HELLASWAG_FILE):  # 11 MB
        download(HELLASWAG_URL, HELLASWAG_FILE,
                 f": put the file at {HELLASWAG_FILE} yourself (eval.py also takes "
                 f"its path: --input=FILE)")
    return HELLASWAG_FILE


def read_hellaswag(path, limit=0):
    """The items of a HellaSwag .jsonl file (the official format: one JSON object per line with
    'ctx', 'endings' and 'label'), the first limit of them (0: all), as (line number,
    ctx, endings, label)."""
    items = []
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ctx, endings, label = item['ctx'], item['endings'], item['label']
            except (ValueError, KeyError, TypeError) as e:  # not JSON, a key missing, not an object
                what = (f"no '{e.args[0]}'" if isinstance(e, KeyError)
                        else f"{type(e).__name__}: {e}")
                raise DataError(f"{path}:{lineno}: not a HellaSwag item ({what}); the official "
                                f"file is {HELLASWAG_URL}") from None
            if not (isinstance(ctx, str) and isinstance(endings, list) and len(endings) == 4
                    and all(isinstance(e, str) for e in endings) and label in (0, 1, 2, 3)):
                raise DataError(f"{path}:{lineno}: a HellaSwag item needs 'ctx' (text), 'endings' "
                                f"(4 texts) and 'label' (0-3); the official file is "
                                f"{HELLASWAG_URL}")
            items.append((lineno, ctx, endings, label))
            if len(items) == limit:
                break
    if not items:
        raise DataError(f"{path} holds no HellaSwag items")
    return items


def render_hellaswag(ctx, endings, tok, block_size):
    """The 4 rows a model scores an item with: inputs x (4, T) and targets y (4, T), where y is -1
    except on the ending's tokens (and padding is -1 too). An ending is encoded with a leading
    space, as it continues the context's last word (GPT-2's BPE spells ' word' as one token). A row
    longer than block_size + 1 loses its first tokens: the ending is always scored whole, with as
    much context as fits."""
    ctx_ids = tok.encode(ctx)
    rows, masks = [], []
    for ending in endings:
        end_ids = tok.encode(' ' + ending)
        rows.append((ctx_ids + end_ids)[-(block_size + 1):])
        masks.append(([0] * len(ctx_ids) + [1] * len(end_ids))[-(block_size + 1):])
    T = max(map(len, rows)) - 1
    x = torch.zeros((4, T), dtype=torch.long)
    y = torch.full((4, T), -1, dtype=torch.long)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        row, mask = torch.tensor(row), torch.tensor(mask)
        x[i, :len(row) - 1] = row[:-1]
        # the target at t is the token at t + 1
        y[i, :len(row) - 1] = torch.where(mask[1:] == 1, row[1:], -1)
    return x, y


@torch.no_grad()
def ending_losses(model, x, y, autocast):
    """(summed loss, mean loss per token) of each of the 4 endings, float32 (4,) each, for x, y on
    one device."""
    with autocast:
        logits, _ = model(x, y)  # (4, T, vocab_size)
    losses = token_losses(logits, y)  # (4, T), 0 outside the ending
    total = losses.sum(dim=1)
    return total, total / (y >= 0).sum(dim=1)


def hellaswag_counts(model, rendered, device, autocast, rank=0, world=1, progress=None):
    """(items, right by acc, right by acc_norm) over rendered, a list of (x, y, label): rank r of
    world scores items r, r + world, ...; the counts are summed over processes. Every process runs
    as many forward passes (FSDP gathers weights in each), the last repeating an item it
    does not count."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, device=device)
    rounds = math.ceil(len(rendered) / world)
    steps = range(rank, rounds * world, world)
    for k in progress(steps) if progress else steps:
        x, y, label = rendered[min(k, len(rendered) - 1)]
        total, mean = ending_losses(model, x.to(device), y.to(device), autocast)
        if k < len(rendered):
            counts += torch.tensor([1.0, total.argmin().item() == label,
                                    mean.argmin().item() == label], device=device)
    if world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    return counts


class HellaSwag:
    """The first n items of HellaSwag's validation split (all of them for n = 0), read now (and
    downloaded once, when missing), rendered for a model's context at the first score():

        hellaswag = HellaSwag(tok, n=100)
        n, acc, acc_norm = hellaswag.score(model, device, autocast)
    """

    def __init__(self, tok, n=0, path=''):
        self.path = hellaswag_file(path)
        self.items = read_hellaswag(self.path, n)
        self.tok, self.rendered, self.block_size = tok, [], None

    def score(self, model, device, autocast, rank=0, world=1, progress=None):
        """(items scored, acc, acc_norm), the same on every process (hellaswag_counts)."""
        if self.block_size != model.config.block_size:  # each item cut to the model's context
            self.block_size, self.rendered = model.config.block_size, []
            for lineno, ctx, endings, label in self.items:
                try:
                    x, y = render_hellaswag(ctx, endings, self.tok, self.block_size)
                except DataError as e:  # a character model: HellaSwag has characters it lacks
                    raise DataError(f"{self.path}:{lineno}: {e}") from None
                self.rendered.append((x, y, label))
        n, right, right_norm = hellaswag_counts(model, self.rendered, device, autocast, rank, world,
                                                progress).tolist()
        return int(n), right / n, right_norm / n
