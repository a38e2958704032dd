"""
Which windows of a prepared dataset a training or evaluation batch reads, and reading them (DESIGN.md,
Determinism: a batch is a pure function of its stream, a tuple of ints). train.py builds one Batches after
check_bins has found the files whole, and asks it for rows:

    batches = Batches(data_dir, meta)
    rows, targets = batches.rows('train', (seed, 0, iter_num, micro_step), batch_size, block_size)  # (B, T + 1), (B, T)
"""

import os

import numpy as np


def mix64(h, *ints):
    """Fold ints into the 64-bit hash h, each by splitmix64's finaliser (Steele, Lea and Flood 2014): a pure
    function, the same on every machine and every numpy or torch version. A few us, where building numpy's
    default_rng(ints) took 270 us between two training steps (its code out of the caches; issue 14)."""
    for v in ints:
        h = (h ^ v) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ h >> 30) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ h >> 27) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h


def draw(stream, n, high):
    """n ints in [0, high), a pure function of stream: where the windows of a batch start. Int j is mix64 of
    the stream and j, modulo high (its bias, high / 2**64, is nil)."""
    h = mix64(0, *stream)
    return [mix64(h, j) % high for j in range(n)]


def step_seed(seed, iter_num, micro_step):
    """The seed of the dropout masks of one global micro-step: like its batch (DESIGN.md, Determinism) a pure
    function of (seed, iter_num, global micro-step index). So the processes of a run draw different masks
    (one seed for all would correlate the noise across the global batch), 2 processes draw the masks 1
    process does, and a resumed run draws the masks the uninterrupted one did, on every device type."""
    return mix64(0, seed, 3, iter_num, micro_step)


class Batches:
    """The token files of data_dir (and a chat dataset's masks and conversation starts), opened once; a window
    is a seek and a read. Not a np.memmap for every batch (0.5 ms between two steps of nanoGPT's CPU command:
    mapping, faulting pages in, unmapping), nor one kept open (it keeps every page it has read mapped, so the
    process seems to grow with the file). On Linux and macOS a run keeps reading the files it opened if
    prepare.py replaces them; on Windows they cannot be replaced while it runs."""

    def __init__(self, data_dir, meta):
        self.data_dir, self.meta, self.chat = data_dir, meta, 'chat' in meta
        self.files = {name: open(os.path.join(data_dir, name), 'rb', buffering=0) for split in ('train', 'val')
                      for name in [f'{split}.bin'] + ([f'{split}_mask.bin'] if self.chat else [])}
        self.starts = {split: np.fromfile(os.path.join(data_dir, f'{split}_starts.bin'), dtype=np.uint64).astype(
            np.int64) for split in ('train', 'val')} if self.chat else {}  # where each conversation begins

    def read(self, name, dtype, start, n):
        """n items of dtype from item start on of data_dir/name; a ValueError if the file ends before."""
        f, size = self.files[name], np.dtype(dtype).itemsize
        f.seek(start * size)
        items = np.frombuffer(f.read(n * size), dtype=dtype)
        if len(items) != n:  # check_bins found it whole: something cut it since
            raise ValueError(f"{os.path.join(self.data_dir, name)} ended before item {start + n:,}: it changed while "
                             f"this run read it; remake it with prepare.py and resume (--init_from=resume)")
        return items

    def rows(self, split, stream, batch_size, block_size):
        """batch_size rows of block_size + 1 tokens (B, T + 1) and their targets (B, T), int64; the rows
        the stream draws."""
        T, n_tokens, dtype = block_size, self.meta[f'{split}_tokens'], self.meta['dtype']
        if not self.chat:
            rows = np.stack([self.read(f'{split}.bin', dtype, i, T + 1)
                             for i in draw(stream, batch_size, n_tokens - T)]).astype(np.int64)  # (B, T + 1)
            return rows, rows[:, 1:]
        # A row starts where a conversation does (never mid-turn) and runs on into the conversations after it:
        # packing, so no compute goes to padding and a conversation is cut only by the row's end (a conversation
        # longer than the row loses its end). Only the split's last rows are padded, with id 0, never a target.
        # Targets outside the assistant's turns are -1, which the loss ignores.
        rows = np.zeros((batch_size, T + 1), dtype=np.int64)  # (B, T + 1)
        counts = np.zeros((batch_size, T + 1), dtype=bool)  # (B, T + 1)
        for r, k in enumerate(draw(stream, batch_size, len(self.starts[split]))):
            i = int(self.starts[split][k])  # where conversation k begins
            n = min(T + 1, n_tokens - i)
            rows[r, :n] = self.read(f'{split}.bin', dtype, i, n)
            counts[r, :n] = self.read(f'{split}_mask.bin', np.uint8, i, n)
        return rows, np.where(counts[:, 1:], rows[:, 1:], -1)  # (B, T + 1), (B, T)
