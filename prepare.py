"""
Turns a text corpus into token ids that train.py reads:

    python prepare.py shakespeare_char                     # tiny Shakespeare, one token per character
    python prepare.py shakespeare                          # tiny Shakespeare, GPT-2 BPE
    python prepare.py tinystories                          # TinyStories (hub, or its files put in data/tinystories/)
    python prepare.py openwebtext                          # OpenWebText from the hub (pip install datasets)
    python prepare.py novel --input=novel.txt --tokenizer=char         # your own text (a file, folder or glob)
    python prepare.py mine --input='books/*.txt' --tokenizer=bpe --vocab_size=8192

Each writes data/<name>/train.bin and val.bin (flat arrays of token ids) and meta.json, which
says how to read them (dtype) and how to turn ids back into text (the tokenizer). Run
python prepare.py --help for every option.

The text is read as a stream and encoded in pieces on every core, so a corpus larger than
memory works; files are written under temporary names and renamed at the end, so an
interrupted run never leaves a truncated train.bin behind.

This file is also the home of the tokenizer helpers train.py and sample.py import
(load_meta, load_tokenizer); importing it does nothing else.
"""

import argparse
import base64
import collections
import glob
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
HF_ENDPOINT = os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')  # mirrors set HF_ENDPOINT

# OpenAI's GPT-2 BPE merge ranks in tiktoken's format, committed so that no download is needed:
# byte for byte the r50k_base file tiktoken fetches (the 'gpt2' encoding), with its sha256.
GPT2_BPE_FILE = os.path.join(DATA_DIR, 'gpt2.tiktoken')
GPT2_BPE_SHA256 = '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930'
# GPT-2's pre-tokenisation pattern, in the faster equivalent form tiktoken uses (tiktoken_ext/openai_public.py)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT = 50256  # <|endoftext|>
EOT_NAMES = ('<|endoftext|>', '</s>', '<|end_of_text|>', '<eos>')  # end-of-text tokens of common tokenizers

# the named datasets: where the text comes from, how documents are separated, the default tokenizer
SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
SHAKESPEARE = dict(files={'input.txt': SHAKESPEARE_URL}, folder='shakespeare_char')  # committed; 1,115,394 chars
TINYSTORIES_URL = HF_ENDPOINT + '/datasets/roneneldan/TinyStories/resolve/main/'
DATASETS = {
    'shakespeare_char': dict(SHAKESPEARE, tokenizer='char'),
    'shakespeare': dict(SHAKESPEARE, tokenizer='gpt2'),
    # stories separated by lines holding <|endoftext|>; blank lines inside a story are part of it
    'tinystories': dict(files={'TinyStoriesV2-GPT4-train.txt': TINYSTORIES_URL + 'TinyStoriesV2-GPT4-train.txt',
                               'TinyStoriesV2-GPT4-valid.txt': TINYSTORIES_URL + 'TinyStoriesV2-GPT4-valid.txt'},
                        folder='tinystories', separator='<|endoftext|>', tokenizer='gpt2'),
    # 8M web documents. The hub's copy used a loading script, which datasets >= 4 refuses; its
    # parquet conversion (revision refs/convert/parquet) loads with any recent release.
    'openwebtext': dict(hub='Skylion007/openwebtext', tokenizer='gpt2', val_fraction=0.0005),  # nanoGPT's 0.05%
}
PIECE_CHARS = 1 << 18  # text is encoded in pieces of ~262k characters: small enough to spread over cores


class DataError(Exception):
    """A problem with the user's data or files: the scripts print its message in one line and exit."""


def need(module, pip_name):
    """Import an optional library, or say which pip install gives it."""
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"this needs the '{pip_name}' library: pip install {pip_name}") from None


# -----------------------------------------------------------------------------
# tokenizers. A tokenizer is described by a small dict (meta.json's "tokenizer"):
#   {"type": "char", "chars": [...]}   id i is chars[i]
#   {"type": "gpt2"}                   GPT-2's BPE, from data/gpt2.tiktoken
#   {"type": "tokenizers", "file": "tokenizer.json"}   a Hugging Face tokenizers file beside the data

def gpt2_encoding():
    """tiktoken's GPT-2 encoding, built from the committed BPE file: works with no network,
    unlike tiktoken.get_encoding('gpt2'), which downloads its vocabulary on first use."""
    tiktoken = need('tiktoken', 'tiktoken')
    with open(GPT2_BPE_FILE, 'rb') as f:
        contents = f.read()
    if hashlib.sha256(contents).hexdigest() != GPT2_BPE_SHA256:
        raise DataError(f"{GPT2_BPE_FILE} is not OpenAI's GPT-2 BPE file: restore it with 'git checkout data/gpt2.tiktoken'")
    # each line: base64 of a token's bytes, then its rank, which is its id
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in contents.splitlines() if line)}
    return tiktoken.Encoding(name='gpt2', pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': GPT2_EOT})


def hf_eot(tok):
    """The id of a Hugging Face tokenizer's end-of-text token, or None."""
    ids = [tok.token_to_id(name) for name in EOT_NAMES]
    return next((i for i in ids if i is not None), None)


def load_tokenizer(meta, data_dir):
    """(encode, decode) for a dataset's tokenizer: encode(str) -> list of ids, decode(ids) -> str."""
    spec = meta['tokenizer']
    if spec['type'] == 'char':
        chars = spec['chars']
        stoi = {ch: i for i, ch in enumerate(chars)}

        def encode(text):
            unknown = sorted(set(text) - stoi.keys())
            if unknown:
                raise DataError(f"characters not in this model's vocabulary of {len(chars)}: "
                                f"{' '.join(repr(c) for c in unknown)}; use only characters of the training text")
            return [stoi[ch] for ch in text]
        return encode, lambda ids: ''.join(chars[i] for i in ids)
    if spec['type'] == 'gpt2':
        enc = gpt2_encoding()
        return enc.encode_ordinary, enc.decode
    if spec['type'] == 'tokenizers':
        tok = need('tokenizers', 'tokenizers').Tokenizer.from_file(os.path.join(data_dir, spec['file']))
        return (lambda text: tok.encode(text, add_special_tokens=False).ids), tok.decode
    raise DataError(f"unknown tokenizer type '{spec['type']}' in {data_dir}/meta.json")


def array_encoder(spec, data_dir, eot):
    """encode(pieces) -> one array of ids: [(text, ends_document)] with eot after each document
    (when eot is not None). The fast path of each tokenizer, for preparing large corpora."""
    if spec['type'] == 'char':
        # characters -> ids with one table lookup: the text's code points index a table of ids
        table = np.zeros(max(map(ord, spec['chars'])) + 1, dtype=np.uint32)
        table[[ord(c) for c in spec['chars']]] = np.arange(len(spec['chars']))
        encode = lambda text: table[np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32)]
    else:
        encode_text = load_tokenizer(dict(tokenizer=spec), data_dir)[0]
        encode = lambda text: np.array(encode_text(text), dtype=np.uint32)

    def encode_pieces(pieces):
        arrays = []
        for text, ends_document in pieces:
            arrays.append(encode(text))
            if ends_document and eot is not None:
                arrays.append(np.array([eot], dtype=np.uint32))
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint32)
    return encode_pieces


def load_meta(data_dir):
    """Read data/<name>/meta.json, or say which command makes it."""
    path = os.path.join(data_dir, 'meta.json')
    name = os.path.basename(os.path.normpath(data_dir))
    if not os.path.isfile(path):
        raise DataError(f"dataset '{name}' is not prepared ({path} is missing): run 'python prepare.py {name}' "
                        f"(or 'python prepare.py {name} --input=YOUR_TEXT') first")
    with open(path, encoding='utf-8') as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# reading text: a stream of (text, ends_document) pieces, never the whole corpus in memory

def download(url, path):
    """Stream url to path (via a temporary file, so an interrupted download leaves nothing)."""
    print(f"downloading {url}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(path + '.tmp', 'wb') as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except OSError as e:
        if os.path.exists(path + '.tmp'):
            os.remove(path + '.tmp')
        raise DataError(f"cannot download {url} ({getattr(e, 'reason', e)}). Without access to it, put the file "
                        f"at {path} yourself, or pass its path with --input (and --val_input)") from None
    os.replace(path + '.tmp', path)


def find_files(pattern):
    """The files of --input: a file, a folder (every .txt file in it, recursively) or a glob."""
    if os.path.isfile(pattern):
        return [pattern]
    if os.path.isdir(pattern):
        files = sorted(glob.glob(os.path.join(pattern, '**', '*.txt'), recursive=True))
    else:
        files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        raise DataError(f"--input '{pattern}' is no file, and no .txt files match it")
    return files


def safe_cut(before, after):
    """May a document be cut between the lines before and after? Only between a line ending in
    a visible character and one starting with one: BPE pre-tokenizers (GPT-2's regex) always split
    there, so the pieces encode to exactly the tokens of the whole document."""
    return len(before) > 1 and not before[-2].isspace() and after[:1] and not after[0].isspace()


def read_pieces(files, separator=None, errors='strict'):
    """Yield the text of files as (text, ends_document) pieces of about PIECE_CHARS characters.
    Each file is a document, or, with a separator, the lines between separator lines are
    (without the blank lines around them). Windows line ends become '\\n'."""
    for path in files:
        buf, size, offset = [], 0, 0
        with open(path, 'rb') as f:
            for raw in f:
                try:
                    line = raw.decode('utf-8', errors)
                except UnicodeDecodeError as e:
                    raise DataError(f"{path} is not UTF-8 text: byte {raw[e.start]:#04x} at offset {offset + e.start}; "
                                    f"convert the file, or pass --errors=replace to replace such bytes with U+FFFD") from None
                offset += len(raw)
                if line.endswith('\r\n'):
                    line = line[:-2] + '\n'
                if separator is not None and line.strip() == separator:
                    if buf:
                        yield ''.join(buf).rstrip(), True
                    buf, size = [], 0
                    continue
                if separator is not None and not buf and not line.strip():
                    continue  # blank lines before a document
                if size >= PIECE_CHARS and safe_cut(buf[-1], line):
                    yield ''.join(buf), False
                    buf, size = [], 0
                buf.append(line)
                size += len(line)
        text = ''.join(buf)
        if separator is not None:
            text = text.rstrip()
        if text or separator is None:
            yield text, True


def hub_pieces(repo):
    """Documents of a Hugging Face hub dataset, streamed (nothing cached but the parquet files)."""
    datasets = need('datasets', 'datasets')
    try:
        stream = datasets.load_dataset(repo, split='train', streaming=True, revision='refs/convert/parquet')
        for row in stream:
            yield row['text'], True
    except Exception as e:  # datasets raises many kinds: connection, HTTP, offline mode, ...
        raise DataError(f"cannot read {repo} from the hub at {HF_ENDPOINT} ({type(e).__name__}: {e}). Without "
                        f"access to it, put the text in .txt files and pass them with --input=FOLDER") from None


def split_pieces(pieces, n_docs, n_chars, val_fraction):
    """Tag each piece 'train' or 'val'. With several documents, every k-th document validates,
    k = 1/val_fraction (or the number of documents, if fewer: then the last one); a single
    document is cut in two: the last val_fraction of its characters validate (as nanoGPT does)."""
    if n_docs == 1:
        cut, seen = int(n_chars * (1 - val_fraction)), 0
        for text, ends in pieces:
            if seen < cut < seen + len(text):
                yield 'train', text[:cut - seen], False
                yield 'val', text[cut - seen:], ends
            else:
                yield ('train' if seen + len(text) <= cut else 'val'), text, ends
            seen += len(text)
        return
    k = max(2, round(1 / val_fraction))
    k = min(k, n_docs) if n_docs else k  # n_docs is None when streaming from the hub
    doc = 0
    for text, ends in pieces:
        yield ('val' if (doc + 1) % k == 0 else 'train'), text, ends
        doc += ends


# -----------------------------------------------------------------------------
# encoding on every core, writing as we go

_worker_encode = None  # each worker process's encoder, built once by _init_worker


def _init_worker(spec, data_dir, eot):
    global _worker_encode
    _worker_encode = array_encoder(spec, data_dir, eot)


def _encode_in_worker(pieces):
    return _worker_encode(pieces)


def encode_to_files(tagged, out_dir, spec, eot, dtype, workers, total_chars):
    """Encode tagged pieces (split, text, ends) into out_dir/<split>.bin.tmp, in order, in batches
    of ~PIECE_CHARS characters spread over worker processes; returns the token count per split."""
    files = {s: open(os.path.join(out_dir, f'{s}.bin.tmp'), 'wb') for s in ('train', 'val')}
    counts = dict(train=0, val=0)
    pending = collections.deque()  # (split, future) in submission order: results are written in order
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(spec, out_dir, eot)) if workers > 1 else None
    encode_here = None if pool else array_encoder(spec, out_dir, eot)
    try:  # on long work, a progress bar with tokens/s when tqdm is installed, else a line every 10 s
        from tqdm import tqdm
        bar = tqdm(unit='tok', unit_scale=True, smoothing=0.1) if workers > 1 else None
    except ImportError:
        bar = None
    t0 = last_report = time.time()
    chars_done = 0

    def write(split, ids):
        nonlocal last_report
        files[split].write(ids.astype(dtype).tobytes())
        counts[split] += len(ids)
        if bar is not None:
            bar.update(len(ids))
        elif workers > 1 and time.time() - last_report > 10:
            last_report = time.time()
            done = f" ({chars_done / total_chars:.0%} of the text)" if total_chars else ''
            print(f"  {sum(counts.values()):,} tokens{done}, {sum(counts.values()) / (time.time() - t0):,.0f} tokens/s")

    def submit(split, batch):
        if pool is None:
            write(split, encode_here(batch))
            return
        pending.append((split, pool.submit(_encode_in_worker, batch)))
        while len(pending) > 2 * workers:  # a bounded window of work in flight keeps memory flat
            s, future = pending.popleft()
            write(s, future.result())

    try:
        batches, sizes = dict(train=[], val=[]), dict(train=0, val=0)
        for split, text, ends in tagged:
            batches[split].append((text, ends))
            sizes[split] += len(text)
            chars_done += len(text)
            if sizes[split] >= PIECE_CHARS:
                submit(split, batches[split])
                batches[split], sizes[split] = [], 0
        for split in ('train', 'val'):
            if batches[split]:
                submit(split, batches[split])
        while pending:
            s, future = pending.popleft()
            write(s, future.result())
    finally:
        for f in files.values():
            f.close()
        if bar is not None:
            bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    return counts


def train_bpe(pieces, vocab_size, path):
    """Train a byte-level BPE tokenizer (GPT-2's kind) on the text with Hugging Face tokenizers."""
    tk = need('tokenizers', 'tokenizers')
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>'],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((text for text, _ in pieces), trainer=trainer)
    tok.save(path)
    return tok


# -----------------------------------------------------------------------------

def prepare(name, input=None, val_input=None, tokenizer=None, vocab_size=4096, separator=None,
            val_fraction=None, errors='strict', workers=0):
    spec = DATASETS.get(name, {})
    separator = separator if separator is not None else spec.get('separator')
    tokenizer = tokenizer or spec.get('tokenizer', 'gpt2')
    val_fraction = val_fraction or spec.get('val_fraction', 0.1)
    out_dir = os.path.join(DATA_DIR, name)
    if not 0 < val_fraction < 1:
        raise DataError(f"--val_fraction must be between 0 and 1, not {val_fraction}")
    if tokenizer not in ('char', 'gpt2', 'bpe'):  # a tokenizer.json, or a model folder holding one (e.g. Qwen2's)
        tokenizer = os.path.join(tokenizer, 'tokenizer.json') if os.path.isdir(tokenizer) else tokenizer
        if not os.path.isfile(tokenizer):
            raise DataError(f"--tokenizer '{tokenizer}' is not char, gpt2, bpe, nor a tokenizer.json file or folder")

    # where the text comes from: --input, the named dataset's files (downloaded if missing), or the hub
    if input:
        sources = dict(train=find_files(input), val=find_files(val_input) if val_input else None)
    elif 'files' in spec:
        paths = []
        for filename, url in spec['files'].items():
            path = os.path.join(DATA_DIR, spec['folder'], filename)
            if not os.path.isfile(path):
                download(url, path)
            paths.append(path)
        sources = dict(train=paths[:1], val=paths[1:] or None)
    elif 'hub' in spec:
        sources = dict(hub=spec['hub'])
        if tokenizer == 'char':
            raise DataError("--tokenizer=char needs the text on disk first: pass it with --input")
    else:
        known = ', '.join(sorted(DATASETS))
        raise DataError(f"unknown dataset '{name}' (known: {known}); for your own text: "
                        f"python prepare.py {name} --input=PATH")
    read = lambda files: read_pieces(files, separator, errors)
    every_file = sources.get('train', []) + (sources.get('val') or [])

    # a first pass over local text: count documents and characters, check the UTF-8, collect characters
    n_docs, n_chars, chars = None, 0, set()
    if 'hub' not in sources:
        n_docs = 0
        for text, ends in read(every_file):
            n_docs, n_chars = n_docs + ends, n_chars + len(text)
            if tokenizer == 'char':
                chars.update(text)
        if n_chars == 0:
            raise DataError(f"the input has no text: {', '.join(every_file)}")
        print(f"{name}: {n_docs:,} document(s), {n_chars:,} characters in {len(every_file)} file(s)")

    # the tokenizer
    os.makedirs(out_dir, exist_ok=True)
    eot = None
    if tokenizer == 'char':
        tok_spec, vocab = dict(type='char', chars=sorted(chars)), len(chars)  # sorted: nanoGPT's ids
    elif tokenizer == 'gpt2':
        tok_spec, vocab, eot = dict(type='gpt2'), gpt2_encoding().n_vocab, GPT2_EOT
    else:
        tok_path = os.path.join(out_dir, 'tokenizer.json')
        if tokenizer == 'bpe':
            print(f"training a byte-level BPE tokenizer of {vocab_size:,} tokens")
            tok = train_bpe(read(sources['train']) if 'train' in sources else hub_pieces(sources['hub']),
                            vocab_size, tok_path + '.tmp')
        else:
            tok = need('tokenizers', 'tokenizers').Tokenizer.from_file(tokenizer)
            tok.save(tok_path + '.tmp')
        os.replace(tok_path + '.tmp', tok_path)
        tok_spec, vocab, eot = dict(type='tokenizers', file='tokenizer.json'), tok.get_vocab_size(), hf_eot(tok)
    if n_docs == 1:
        eot = None  # a single text has no document ends to learn (and keeps nanoGPT's token counts)

    # uint16 holds ids up to 65,535: half the disk and memory of uint32. A larger vocabulary
    # switches to uint32, so an id never wraps around silently.
    dtype = 'uint16' if vocab <= 2 ** 16 else 'uint32'
    if 'hub' in sources:
        tagged = split_pieces(hub_pieces(sources['hub']), None, 0, val_fraction)
    elif sources['val']:
        tagged = itertools.chain((('train', t, e) for t, e in read(sources['train'])),
                                 (('val', t, e) for t, e in read(sources['val'])))
    else:
        tagged = split_pieces(read(sources['train']), n_docs, n_chars, val_fraction)
    # processes pay off only beyond a few MB of text: they start in ~0.5 s and load the tokenizer
    workers = workers or (1 if n_chars and n_chars < 16 * PIECE_CHARS else len(os.sched_getaffinity(0))
                          if hasattr(os, 'sched_getaffinity') else os.cpu_count())
    t0 = time.time()
    meta_path = os.path.join(out_dir, 'meta.json')
    try:
        counts = encode_to_files(tagged, out_dir, tok_spec, eot, dtype, workers, n_chars)
        if os.path.exists(meta_path):
            os.remove(meta_path)  # the old meta.json must not describe the new .bin files, even for a moment
        for split in ('train', 'val'):
            os.replace(os.path.join(out_dir, f'{split}.bin.tmp'), os.path.join(out_dir, f'{split}.bin'))
    finally:
        for split in ('train', 'val'):  # after an error or Ctrl-C: no temporary file stays behind
            tmp = os.path.join(out_dir, f'{split}.bin.tmp')
            if os.path.exists(tmp):
                os.remove(tmp)
    meta = dict(vocab_size=vocab, dtype=dtype, train_tokens=counts['train'], val_tokens=counts['val'],
                tokenizer=tok_spec, eot_id=eot)
    with open(meta_path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    os.replace(meta_path + '.tmp', meta_path)  # written last: a meta.json means the dataset is complete

    dt = time.time() - t0
    total = counts['train'] + counts['val']
    print(f"{name}: vocab {vocab:,}, {counts['train']:,} train and {counts['val']:,} val tokens ({dtype}) "
          f"in {out_dir}; {total / dt:,.0f} tokens/s on {workers} process(es)")
    for split in ('train', 'val'):
        if counts[split] < 1025:
            print(f"warning: the {split} split has only {counts[split]:,} tokens; train.py needs block_size + 1 "
                  f"tokens per split, so block_size must be at most {max(counts[split] - 1, 0)}")
    return meta


def main():
    parser = argparse.ArgumentParser(description="Tokenize a corpus into data/<name>/ for train.py.",
                                     epilog="named datasets: " + ', '.join(sorted(DATASETS)))
    parser.add_argument('name', help="a named dataset, or the name of data/<name>/ for your --input")
    parser.add_argument('--input', help="your text: a file, a folder of .txt files, or a glob ('books/*.txt')")
    parser.add_argument('--val_input', help="validation text (file, folder or glob); default: split from --input")
    parser.add_argument('--tokenizer', help="char | gpt2 | bpe (train one) | a tokenizer.json or a folder "
                                            "holding one (e.g. a Qwen2 model); default: the dataset's, else gpt2")
    parser.add_argument('--vocab_size', type=int, default=4096, help="size of a new bpe tokenizer (default 4096)")
    parser.add_argument('--separator', help="a line holding only this separates documents in a file "
                                            "(TinyStories: '<|endoftext|>'); default: each file is a document")
    parser.add_argument('--val_fraction', type=float, help="share of the text that validates (default 0.1)")
    parser.add_argument('--errors', choices=('strict', 'replace'), default='strict',
                        help="bytes that are not UTF-8: stop (strict) or replace them with U+FFFD")
    parser.add_argument('--workers', type=int, default=0, help="encoding processes (default: one per core)")
    args = parser.parse_args()
    try:
        prepare(**vars(args))
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: nothing was written")


if __name__ == '__main__':
    main()
