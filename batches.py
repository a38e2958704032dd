"""
Which windows of a prepared dataset a batch reads, and reading them. A batch is a pure function of
its stream, a tuple of ints (docs/design.md, Determinism): training step iter_num's micro-step m
reads train_stream(seed, iter_num, m) whatever the number of processes, and an evaluation reads
the same eval_stream(split, k) batches in every run. train.py asks for rows:

    batches = Batches('shakespeare_char', meta)
    x, y = batches.get('train', train_stream(1337, 0, 0), batch_size=12, block_size=64)  # (B, T)
"""

import os

import numpy as np
import torch

from tokenizer import DATA_DIR


def mix64(h, *ints):
    """Fold ints into the 64-bit hash h, each by splitmix64's finaliser (Steele, Lea and Flood
    2014): a pure function, the same on every machine and every numpy or torch version."""
    for v in ints:
        h = (h ^ v) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ h >> 30) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ h >> 27) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h


def draw(stream, n, high):
    """n ints in [0, high), a pure function of stream: where the windows of a batch start. Int j is
    mix64 of the stream and j, modulo high (its bias, high / 2**64, is nil)."""
    h = mix64(0, *stream)
    return [mix64(h, j) % high for j in range(n)]


def train_stream(seed, iter_num, micro_step):
    """The stream of a training batch: global micro-step micro_step of step iter_num."""
    return (seed, 0, iter_num, micro_step)


def eval_stream(split, k):
    """The stream of an evaluation's k-th batch of split: the same in every run, any seed."""
    return (0, 1 if split == 'train' else 2, k, 0)


def step_seed(seed, iter_num, micro_step):
    """The seed of the dropout masks of one global micro-step: like its batch a pure function of
    (seed, iter_num, micro_step). So the processes of a run draw different masks, 2 processes draw
    the masks 1 process does, and a resumed run draws the masks the uninterrupted one did."""
    return mix64(0, seed, 3, iter_num, micro_step)


class Batches:
    """The token files of data/<dataset> (and a chat dataset's masks and conversation starts),
    opened once; a window is a seek and a read (a np.memmap kept open would keep every page it read
    mapped; one made per batch costs mapping and unmapping). On Linux and macOS a run keeps reading
    the files it opened if prepare.py replaces them; on Windows they cannot be replaced."""

    def __init__(self, dataset, meta):
        self.data_dir, self.meta, self.chat = os.path.join(DATA_DIR, dataset), meta, 'chat' in meta
        names = [f'{split}{kind}.bin' for split in ('train', 'val')
                 for kind in (['', '_mask'] if self.chat else [''])]
        self.files = {name: open(os.path.join(self.data_dir, name), 'rb', buffering=0)
                      for name in names}
        self.starts = {}  # where each conversation begins
        for split in ('train', 'val') if self.chat else ():
            path = os.path.join(self.data_dir, f'{split}_starts.bin')
            self.starts[split] = np.fromfile(path, dtype=np.uint64).astype(np.int64)

    def read(self, name, dtype, start, n):
        """n items of dtype from item start on of data_dir/name; a ValueError if the file ends
        before."""
        f, size = self.files[name], np.dtype(dtype).itemsize
        f.seek(start * size)
        items = np.frombuffer(f.read(n * size), dtype=dtype)
        if len(items) != n:  # check_bins found it whole: something cut it since
            raise ValueError(f"{os.path.join(self.data_dir, name)} ended before item "
                             f"{start + n:,}: it changed while this run read it; remake it with "
                             f"prepare.py and resume (--init_from=resume)")
        return items

    def rows(self, split, stream, batch_size, block_size):
        """batch_size rows of block_size + 1 tokens (B, T + 1) and their targets (B, T), int64; of
        a dataset of preference pairs, 2 B rows: the chosen replies' conversations, then the
        rejected ones'."""
        T, n_tokens, dtype = block_size, self.meta[f'{split}_tokens'], self.meta['dtype']
        if 'train_pairs' in self.meta:
            ids = draw(stream, batch_size, self.meta[f'{split}_pairs'])
            return self.conversations(split, [2 * k for k in ids] + [2 * k + 1 for k in ids], T)
        if not self.chat:
            rows = np.stack([self.read(f'{split}.bin', dtype, i, T + 1)
                             for i in draw(stream, batch_size, n_tokens - T)]).astype(np.int64)
            return rows, rows[:, 1:]  # (B, T + 1), (B, T)
        # A row starts where a conversation does (never mid-turn) and runs on into the ones after
        # it: packing, so no compute goes to padding, and a conversation is cut only by the row's
        # end. Only the split's last rows are padded, with id 0, never a target. Targets outside the
        # assistant's turns are -1, which the loss ignores.
        rows = np.zeros((batch_size, T + 1), dtype=np.int64)  # (B, T + 1)
        counts = np.zeros((batch_size, T + 1), dtype=bool)  # (B, T + 1)
        for r, k in enumerate(draw(stream, batch_size, len(self.starts[split]))):
            i = int(self.starts[split][k])  # where conversation k begins
            n = min(T + 1, n_tokens - i)
            rows[r, :n] = self.read(f'{split}.bin', dtype, i, n)
            counts[r, :n] = self.read(f'{split}_mask.bin', np.uint8, i, n)
        return rows, np.where(counts[:, 1:], rows[:, 1:], -1)  # (B, T + 1), (B, T)

    def conversations(self, split, convs, block_size):
        """Conversations convs of split, one a row, cut at block_size + 1 tokens: (N, T + 1) ids, 0
        after a conversation's end, and (N, T) targets, -1 but on the tokens its mask learns."""
        T, starts, dtype = block_size, self.starts[split], self.meta['dtype']
        ends = [*starts[1:], self.meta[f'{split}_tokens']]
        rows = np.zeros((len(convs), T + 1), dtype=np.int64)  # (N, T + 1)
        counts = np.zeros((len(convs), T + 1), dtype=bool)  # (N, T + 1)
        for r, c in enumerate(convs):
            n = min(T + 1, int(ends[c] - starts[c]))
            rows[r, :n] = self.read(f'{split}.bin', dtype, int(starts[c]), n)
            counts[r, :n] = self.read(f'{split}_mask.bin', np.uint8, int(starts[c]), n)
        return rows, np.where(counts[:, 1:], rows[:, 1:], -1)  # (N, T + 1), (N, T)

    def pairs(self, split, ids, block_size, device='cpu'):
        """Inputs and targets (2 B, T) of the preference pairs ids (B of them), on device: the
        chosen replies' conversations, then the rejected ones'."""
        convs = [2 * k for k in ids] + [2 * k + 1 for k in ids]
        return self.tensors(*self.conversations(split, convs, block_size), device)

    def get(self, split, stream, batch_size, block_size, device='cpu'):
        """Inputs x and targets y (x shifted by one; -1 where nothing is learned), (B, T) each, on
        device: pinned host memory first on a GPU, so that the copy runs asynchronously."""
        return self.tensors(*self.rows(split, stream, batch_size, block_size), device)

    def tensors(self, rows, targets, device):
        """rows (B, T + 1) and targets (B, T) as inputs x and targets y, (B, T) each, on device."""
        x = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))  # (B, T)
        y = torch.from_numpy(np.ascontiguousarray(targets))  # (B, T)
        if device.startswith('cuda'):
            x, y = x.pin_memory(), y.pin_memory()
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x.to(device), y.to(device)
