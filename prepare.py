"""
Turns a text corpus into token ids that train.py reads (python prepare.py --help for every option):

    python prepare.py shakespeare_char    # tiny Shakespeare, one token per character
    python prepare.py shakespeare         # tiny Shakespeare, GPT-2 BPE
    python prepare.py tinystories         # TinyStories (hub, or its files in data/tinystories/)
    python prepare.py openwebtext         # OpenWebText from the hub (pip install datasets)
    python prepare.py novel --input=novel.txt --tokenizer=char  # your text (a file, folder or glob)
    python prepare.py mine --input='books/*.txt' --tokenizer=bpe --vocab_size=8192
    python prepare.py sft --input=chats.jsonl --tokenizer=data/shakespeare_char  # conversations
    python prepare.py alpaca              # tatsu-lab/alpaca (hub); alpaca_zh: shibing624/alpaca-zh

Each writes data/<name>/train.bin and val.bin (flat arrays of token ids) and meta.json (their
dtype and tokenizer), encoded a chunk at a time on every core, so a corpus larger than memory
works; files are renamed into place when whole. Conversations and preference pairs
(conversations.py) also write their targets and starts (docs/design.md, Data on disk).
"""

import argparse
import collections
import glob
import json
import os
import re
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from downloads import HF_ENDPOINT, download, hub_batches
from conversations import encode_conversations, read_conversations
from tokenizer import (DATA_DIR, GPT2_EOT, DataError, Tokenizer, eot_of, find_files,
                       gpt2_encoding, tokenizers_file)

# the named datasets: their text (files at url + name, kept in data/<folder or name>/; or a hub
# dataset), how documents are separated, the default tokenizer
SHAKESPEARE = dict(
    url='https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/',
    files=['input.txt'], folder='shakespeare_char')  # committed; 1,115,394 chars
DATASETS = {
    'shakespeare_char': dict(SHAKESPEARE, tokenizer='char'),
    'shakespeare': dict(SHAKESPEARE, tokenizer='gpt2'),
    # stories separated by lines holding <|endoftext|>; blank lines inside a story are part of it
    'tinystories': dict(url=HF_ENDPOINT + '/datasets/roneneldan/TinyStories/resolve/main/',
                        separator='<|endoftext|>',
                        files=['TinyStoriesV2-GPT4-train.txt', 'TinyStoriesV2-GPT4-valid.txt'],
                        tokenizer='gpt2'),
    # 8M web documents. The hub's copy used a loading script, which datasets >= 4 refuses; its
    # parquet conversion (revision refs/convert/parquet) loads with any recent release.
    # nanoGPT's 0.05% validates
    'openwebtext': dict(hub='Skylion007/openwebtext', tokenizer='gpt2', val_fraction=0.0005),
    # instruction/input/output records (Stanford Alpaca's 52,002; the Chinese translation's
    # 48,818), for chat SFT
    # a skill for a character model to learn on a CPU in minutes (docs/chat.md): 3 letters in, in
    # capitals out; 'again' repeats the last answer. 2,000 conversations (tests/letters.py's
    # skill(2000, 2)); 100 words held out
    'letters_chat': dict(files=['conversations.jsonl'], chat=True,
                         tokenizer='data/shakespeare_char', val_fraction=0.05),
    # the same words, each reply ending with '!' or '.' half and half; then pairs preferring '!'
    # (DPO). tests/letters.py made all three files
    'letters_styles': dict(files=['conversations.jsonl'], chat=True,
                           tokenizer='data/shakespeare_char', val_fraction=0.05),
    'letters_prefs': dict(files=['pairs.jsonl'], chat=True, tokenizer='data/shakespeare_char',
                          val_fraction=0.05),
    'alpaca': dict(hub='tatsu-lab/alpaca', tokenizer='gpt2', chat=True, val_fraction=0.02),
    'alpaca_zh': dict(hub='shibing624/alpaca-zh', tokenizer='gpt2', chat=True, val_fraction=0.02),
}
CHAT_FILES = ('.jsonl', '.json')
# beside a chat dataset's ids
CHAT_BINS = ('train_mask.bin', 'val_mask.bin', 'train_starts.bin', 'val_starts.bin')
CHUNK_BYTES = 1 << 20  # text is encoded in chunks of ~1 MB: small enough to spread over cores


# -----------------------------------------------------------------------------
# finding the text, and cutting it into chunks: the unit of work of an encoding process

def is_conversations(pattern):
    """--input names conversations: .jsonl/.json files, or a folder holding them (and no .txt)."""
    if os.path.isdir(pattern):
        return not glob.glob(os.path.join(pattern, '**', '*.txt'), recursive=True) and \
            any(glob.glob(os.path.join(pattern, '**', '*' + e), recursive=True) for e in CHAT_FILES)
    return pattern.endswith(CHAT_FILES)


# A document without separators is cut at a line end between two visible characters: the
# pre-tokenizers of GPT-2 and of models such as Qwen2 always split there, so the chunks encode to
# exactly the tokens of the whole. Unicode spaces (U+00A0, U+2000.., U+3000, ...) count as white:
# their last UTF-8 byte is excluded before the newline and their bytes after it.
SAFE_LINE_END = re.compile(rb'(?<![\s\x80-\x8a\x9f\xa0\xa8\xa9\xaf])\n'
                           rb'(?![\s]|\xc2[\x85\xa0]|\xe1\x9a\x80|\xe2\x80[\x80-\x8a\xa8\xa9\xaf]'
                           rb'|\xe2\x81\x9f|\xe3\x80\x80)')
# characters need no care; nor does a text with no safe place in 32 MB
ANY_LINE_END = re.compile(rb'\n')


def chunks(path, separator, lo, hi, safe=True):
    """Byte ranges (start, end, ends_document) of about CHUNK_BYTES covering [lo, hi) of a file.
    With a separator, each ends after a separator line, so it holds whole documents."""
    pattern = re.compile(rb'\n[ \t\r]*' + re.escape(separator.encode()) + rb'[ \t\r]*\n') \
        if separator else SAFE_LINE_END if safe else ANY_LINE_END
    out, start = [], lo
    with open(path, 'rb') as f:
        while start < hi:
            end = start + CHUNK_BYTES
            while end < hi:  # move end to the next place the text may be cut
                f.seek(end - 1)
                window = f.read(CHUNK_BYTES + 1)  # one byte before end, for the look-behind
                m = pattern.search(window, 1) or (end - start > 32 * CHUNK_BYTES
                                                  and ANY_LINE_END.search(window, 1))
                if m:
                    end += m.end() - 1
                    break
                end += CHUNK_BYTES
            end = min(end, hi)
            out.append((start, end, end == os.path.getsize(path) or separator is not None))
            start = end
    return out


def count_documents(files, separator):
    """About how many documents the files hold (separators are counted, not parsed)."""
    if separator is None:
        return len(files)
    n, sep = 0, separator.encode()
    for path in files:
        count, tail = 0, b''
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 24), b''):
                count += (tail + block).count(sep)
                tail = block[-(len(sep) - 1):] if len(sep) > 1 else b''
        n += max(count, 1)
    return n


# -----------------------------------------------------------------------------
# the work of an encoding process. A task is (split, 'file', path, start, end, ends_document) or
# (split, 'docs', [texts]); split is 'train', 'val' or 'auto' (chosen per document, see prepare).

_worker = {}  # this process's settings and encoder, set once by _init_worker


def _init_worker(spec, data_dir, eot, separator, errors, dtype='uint32'):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    # a line holding only the separator (this form splits 4x faster than one with (?m)^...$)
    sep = re.compile(rf'\n[ \t]*{re.escape(separator)}[ \t]*(?=\n|\Z)') if separator else None
    _worker.update(encode=Tokenizer(spec, data_dir).array_encoder() if spec else None, eot=eot,
                   sep=sep, errors=errors, dtype=dtype)


def task_texts(task):
    """(documents, whether the last one ends here) of a task."""
    if task[1] == 'docs':
        return task[2], True
    _, _, path, start, end, ends = task
    with open(path, 'rb') as f:
        f.seek(start)
        raw = f.read(end - start)
    try:
        text = raw.decode('utf-8', _worker['errors']).replace('\r\n', '\n')
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: byte {raw[e.start]:#04x} at offset "
                        f"{start + e.start}; convert the file, or pass --errors=replace to replace "
                        f"such bytes with U+FFFD") from None
    if _worker['sep'] is None:
        return [text], ends
    # the lines between separator lines are a document, without the blank lines around it
    return [d for d in (d.strip() for d in _worker['sep'].split('\n' + text)) if d], True


def _encode_task(task):
    """-> (split, ids, tokens per document, whether the last document ends here)"""
    docs, ends = task_texts(task)
    arrays = [_worker['encode'](d) for d in docs]
    # each document that ends here is followed by the end-of-text token
    if _worker['eot'] is not None:
        n_ends = len(arrays) - (not ends)
        arrays[:n_ends] = [np.append(a, np.uint32(_worker['eot'])) for a in arrays[:n_ends]]
    lens = np.array([len(a) for a in arrays], dtype=np.int64)
    ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint32)
    return task[0], ids.astype(_worker['dtype']), lens, ends  # uint16: half the bytes to send back


def _chars_of_task(task):
    return set().union(*task_texts(task)[0])


def run_tasks(fn, tasks, workers, init):
    """fn(task) for each task, in order, on worker processes; results are yielded in order. At most
    2 tasks per process are in flight, so memory stays flat whatever the corpus size."""
    if workers == 1:
        _init_worker(*init)
        yield from map(fn, tasks)
        return
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=init) as pool:
        pending = collections.deque()
        try:
            for task in tasks:
                pending.append(pool.submit(fn, task))
                if len(pending) > 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(cancel_futures=True)


def progress_bar():
    """A progress bar with tokens/s (tqdm), or None when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        print("(pip install tqdm for a progress bar)")
        return None
    return tqdm(unit='tok', unit_scale=True, smoothing=0.1)


# -----------------------------------------------------------------------------

def prepare(name, input=None, val_input=None, tokenizer=None, vocab_size=4096, separator=None,
            val_fraction=None, errors='strict', workers=0, chat_template='ours'):
    spec = DATASETS.get(name, {})
    separator = separator if separator is not None else spec.get('separator')
    tokenizer = tokenizer or spec.get('tokenizer', 'gpt2')
    val_fraction = spec.get('val_fraction', 0.1) if val_fraction is None else val_fraction
    out_dir = os.path.join(DATA_DIR, name)
    if not 0 < val_fraction < 1:
        raise DataError(f"--val_fraction must be between 0 and 1, not {val_fraction}")
    if spec.get('chat') or (input and is_conversations(input)):
        files = find_files(input, CHAT_FILES) if input else \
            [os.path.join(DATA_DIR, name, f) for f in spec.get('files', [])]
        # a hub dataset's records (where None: a malformed one is skipped, and counted)
        if spec.get('hub') and not files:
            records = lambda: ((None, 'auto', r) for batch in hub_batches(spec['hub'], column=None)
                               for r in batch)
        else:  # --val_input's validate; the others are split ('auto')
            records = lambda: read_conversations(files,
                                                 val_input and find_files(val_input, CHAT_FILES))
        return write_dataset(out_dir, lambda tmp: encode_conversations(
            name, records, tokenizer, vocab_size, val_fraction, chat_template, tmp, DATA_DIR))
    # a tokenizer.json, or a model folder holding one (e.g. Qwen2's)
    if tokenizer not in ('char', 'gpt2', 'bpe'):
        tokenizer = (os.path.join(tokenizer, 'tokenizer.json') if os.path.isdir(tokenizer)
                     else tokenizer)
        if not os.path.isfile(tokenizer):
            raise DataError(f"--tokenizer '{tokenizer}' is not char, gpt2, bpe, nor a "
                            f"tokenizer.json file or folder")

    # the text, as tasks that each name their split; 'auto' picks by document: every k-th
    # one validates
    k = max(2, round(1 / val_fraction))
    if 'hub' in spec and not input:
        if tokenizer == 'char':
            raise DataError("--tokenizer=char needs the text on disk first: pass it with --input")
        n_docs, n_bytes = None, 0
        tasks = lambda: (('auto', 'docs', batch) for batch in hub_batches(spec['hub']))
    else:  # files: --input, or the named dataset's (downloaded when missing)
        if input:
            train_files, val_files = find_files(input), find_files(val_input) if val_input else []
        elif 'files' in spec:
            paths = [os.path.join(DATA_DIR, spec.get('folder', name), f) for f in spec['files']]
            for path, f in zip(paths, spec['files']):
                if not os.path.isfile(path):
                    download(spec['url'] + f, path,
                             f". Without access to it, put the file at {path} yourself, "
                             f"or pass its path with --input (and --val_input)")
            train_files, val_files = paths[:1], paths[1:]
        else:
            raise DataError(f"unknown dataset '{name}' (known: {', '.join(sorted(DATASETS))}); "
                            f"for your own text: python prepare.py {name} --input=PATH")
        n_bytes = sum(os.path.getsize(f) for f in train_files + val_files)
        if n_bytes == 0:
            raise DataError(f"the input has no text (it is empty): "
                            f"{', '.join(train_files + val_files)}")
        n_docs = count_documents(train_files + val_files, separator)
        k = min(k, n_docs)  # with fewer than k documents, the last one validates
        file_tasks = lambda files, split, lo=0, hi=None: [
            (split, 'file', f, *c) for f in files
            for c in chunks(f, separator, lo, hi or os.path.getsize(f), tokenizer != 'char')]
        if val_files:
            tasks = lambda: file_tasks(train_files, 'train') + file_tasks(val_files, 'val')
        elif n_docs == 1:  # one document: the last val_fraction of it validates (nanoGPT's split)
            f, size = train_files[0], os.path.getsize(train_files[0])
            with open(f, 'rb') as fh:  # the cut, moved off the middle of a multi-byte character
                fh.seek(int(size * (1 - val_fraction)))
                cut = fh.tell() + next((i for i, b in enumerate(fh.read(4)) if b & 0xC0 != 0x80), 0)
            tasks = lambda: file_tasks([f], 'train', 0, cut) + file_tasks([f], 'val', cut, size)
        else:
            tasks = lambda: file_tasks(train_files, 'auto')
        print(f"{name}: {n_bytes / 1e6:,.1f} MB in {len(train_files + val_files)} file(s), "
              f"~{n_docs:,} document(s)")
    # processes pay off beyond a few MB of text: each takes ~0.5 s to start and load the tokenizer
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    workers = workers or (cores if n_bytes == 0 or n_bytes > 8 * CHUNK_BYTES else 1)

    return write_dataset(out_dir, lambda tmp: encode_and_write(
        name, tasks, tokenizer, vocab_size, n_docs, k, workers, separator, errors, out_dir, tmp))


def write_dataset(out_dir, write):
    """meta = write(tmp), which writes the dataset's files under the names tmp gives, and meta.json;
    then they replace the old ones."""
    # every file is written as .tmp and renamed at the end, so an old dataset stays whole until
    # the new one is complete; on any error, or Ctrl-C, the .tmp files go, and so does a folder
    # this run created
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tmp = {f: os.path.join(out_dir, f + '.tmp')
           for f in ('train.bin', 'val.bin', 'tokenizer.json', *CHAT_BINS, 'meta.json')}
    try:
        meta = write(tmp)
        with open(tmp['meta.json'], 'w', encoding='utf-8') as f:
            json.dump(meta, f, ensure_ascii=False, indent=1)
    except BaseException:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    meta_path = os.path.join(out_dir, 'meta.json')
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the old meta.json must not describe the new files, even for a moment
    for f, path in tmp.items():
        if os.path.exists(path):
            # meta.json last: its presence means complete
            os.replace(path, os.path.join(out_dir, f))
    for split in ('train', 'val'):
        if meta[f'{split}_tokens'] < 1025:
            print(f"warning: the {split} split has only {meta[f'{split}_tokens']:,} tokens; "
                  f"train.py needs block_size + 1 tokens per split, so block_size must be at most "
                  f"{max(meta[f'{split}_tokens'] - 1, 0)}")
    return meta


def training_texts(tasks, k):
    """The documents of tasks that train, for a new tokenizer: not the val split's, nor the
    documents an 'auto' task gives it (numbered as encode_and_write numbers them)."""
    doc = 0
    for task in tasks:
        if task[0] != 'val':
            texts, ends = task_texts(task)
            yield from (t for i, t in enumerate(texts) if task[0] == 'train' or (doc + i + 1) % k)
            doc += (len(texts) - (not ends)) if task[0] == 'auto' else 0


def encode_and_write(name, tasks, tokenizer, vocab_size, n_docs, k, workers, separator, errors,
                     out_dir, tmp):
    """Make the tokenizer, encode every task and write train.bin and val.bin (as .tmp files);
    returns meta.json's dict."""
    # _init_worker's arguments, without a tokenizer yet
    init = (None, out_dir, None, separator, errors)
    eot = None
    # the characters of the whole text, collected in parallel; sorted gives nanoGPT's ids
    if tokenizer == 'char':
        chars = sorted(set().union(*run_tasks(_chars_of_task, tasks(), workers, init)))
        tok_spec, vocab = dict(type='char', chars=chars), len(chars)
    elif tokenizer == 'gpt2':
        tok_spec, vocab, eot = dict(type='gpt2'), gpt2_encoding().n_vocab, GPT2_EOT
    else:
        if tokenizer == 'bpe':
            print(f"training a byte-level BPE tokenizer of {vocab_size:,} tokens")
            _init_worker(*init)  # training_texts reads the tasks as a worker does
        tok = tokenizers_file(tokenizer, lambda: training_texts(tasks(), k), vocab_size,
                              tmp['tokenizer.json'])
        tok_spec, vocab, eot = (dict(type='tokenizers', file='tokenizer.json'),
                                tok.get_vocab_size(), eot_of(tok))
    if n_docs == 1:
        eot = None  # a single text has no document ends to learn (and keeps nanoGPT's token counts)

    # uint16 holds ids up to 65,535 in half the bytes; a larger vocabulary takes uint32,
    # never wrapping an id
    dtype = 'uint16' if vocab <= 2 ** 16 else 'uint32'
    t0, counts, doc, bar = time.time(), dict(train=0, val=0), 0, None
    # the workers read a new tokenizer from its temporary name
    work_spec = (dict(tok_spec, file='tokenizer.json.tmp') if tok_spec['type'] == 'tokenizers'
                 else tok_spec)
    with open(tmp['train.bin'], 'wb') as train_f, open(tmp['val.bin'], 'wb') as val_f:
        files = dict(train=train_f, val=val_f)
        try:
            init = (work_spec, out_dir, eot, separator, errors, dtype)
            for task_no, (split, ids, lens, ends) in enumerate(
                    run_tasks(_encode_task, tasks(), workers, init)):
                parts = {split: ids}
                if split == 'auto':  # document number doc + i validates when (doc + i + 1) % k == 0
                    is_val = np.repeat((doc + np.arange(len(lens)) + 1) % k == 0, lens)
                    parts = dict(train=ids[~is_val], val=ids[is_val])
                    doc += len(lens) - (not ends)
                for s, part in parts.items():
                    files[s].write(memoryview(part))
                    counts[s] += len(part)
                # once there is progress to show (None without tqdm)
                if task_no == 0 and workers > 1:
                    bar = progress_bar()
                if bar is not None:
                    bar.update(len(ids))
        finally:
            if bar is not None:
                bar.close()
    if counts['train'] == 0:
        raise DataError("the input has no text to train on (is it only whitespace?)")
    meta = dict(vocab_size=vocab, dtype=dtype, train_tokens=counts['train'],
                val_tokens=counts['val'], tokenizer=tok_spec, eot_id=eot)
    dt = time.time() - t0
    print(f"{name}: vocab {vocab:,}, {counts['train']:,} train and {counts['val']:,} val tokens "
          f"({dtype}) in {out_dir}; {(counts['train'] + counts['val']) / dt:,.0f} tokens/s on "
          f"{workers} process(es)")
    return meta


def main():
    parser = argparse.ArgumentParser(
        description="Tokenize a corpus into data/<name>/ for train.py.",
        epilog="named datasets: " + ', '.join(sorted(DATASETS)))
    parser.add_argument('name',
                        help="a named dataset, or the name of data/<name>/ for your --input")
    parser.add_argument('--input',
                        help="your text: a file, a folder of .txt files, or a glob "
                             "('books/*.txt'); conversations: .jsonl or .json files (a file, "
                             "folder or glob)")
    parser.add_argument('--val_input',
                        help="validation text (file, folder or glob); default: split from --input")
    parser.add_argument('--tokenizer',
                        help="char | gpt2 | bpe (train one) | a tokenizer.json or a folder "
                             "holding one (e.g. a Qwen2 model) | data/<dataset> (conversations: "
                             "that dataset's tokenizer exactly); default: the dataset's, else gpt2")
    parser.add_argument('--vocab_size', type=int, default=4096,
                        help="size of a new bpe tokenizer (default 4096)")
    parser.add_argument('--separator',
                        help="a line holding only this separates documents in a file "
                             "(TinyStories: '<|endoftext|>'); default: each file is a document")
    parser.add_argument('--val_fraction', type=float,
                        help="share of the text that validates (default 0.1)")
    parser.add_argument('--errors', choices=('strict', 'replace'), default='strict',
                        help="bytes that are not UTF-8: stop (strict) or replace them with U+FFFD")
    parser.add_argument('--workers', type=int, default=0,
                        help="encoding processes (default: one per core)")
    parser.add_argument('--chat_template', choices=('ours', 'model'), default='ours',
                        help="conversations: our template, its markers added after the "
                             "tokenizer's ids (ours), or the one of --tokenizer's model folder "
                             "(model)")
    args = parser.parse_args()
    try:
        prepare(**vars(args))
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: nothing was written")


if __name__ == '__main__':
    main()
