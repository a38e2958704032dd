"""
Turns a text corpus into token ids that train.py reads:

    python prepare.py shakespeare_char   # tiny Shakespeare, one token per character (vocab 65)
    python prepare.py shakespeare        # tiny Shakespeare, GPT-2's BPE tokens (vocab 50257)

writes data/<name>/train.bin and val.bin (flat arrays of token ids) and meta.json, which says
how to read them (dtype) and how to turn ids back into text (the tokenizer).

This file is also the home of the tokenizer helpers train.py and sample.py import
(load_meta, load_tokenizer, gpt2_encoding); importing it does nothing else.
"""

import argparse
import base64
import hashlib
import json
import os
import sys
import urllib.request

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')

# OpenAI's GPT-2 BPE merge ranks in tiktoken's format, committed so that no download is needed:
# byte for byte the r50k_base file tiktoken fetches (the 'gpt2' encoding), with its sha256.
GPT2_BPE_FILE = os.path.join(DATA_DIR, 'gpt2.tiktoken')
GPT2_BPE_SHA256 = '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930'
# GPT-2's pre-tokenisation pattern, in the faster equivalent form tiktoken uses (tiktoken_ext/openai_public.py)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT = 50256  # <|endoftext|>

# tiny Shakespeare (1,115,394 characters, public domain), committed; the download is for a
# user who deletes it. The same file nanoGPT's and char-rnn's tutorials use.
SHAKESPEARE = dict(
    path=os.path.join(DATA_DIR, 'shakespeare_char', 'input.txt'),
    url='https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
    sha256='86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed',
)

# the named datasets: where their text comes from and how it is tokenized
DATASETS = {
    'shakespeare_char': dict(source=SHAKESPEARE, tokenizer='char'),
    'shakespeare': dict(source=SHAKESPEARE, tokenizer='gpt2'),
}


class DataError(Exception):
    """A problem with the user's data or files: the scripts print its message in one line and exit."""


# -----------------------------------------------------------------------------
# tokenizers: each is a pair of functions, encode(str) -> list of ids and decode(ids) -> str

def sha256_of(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def gpt2_encoding():
    """tiktoken's GPT-2 encoding, built from the committed BPE file: works with no network,
    unlike tiktoken.get_encoding('gpt2'), which downloads its vocabulary on first use."""
    import tiktoken
    if not os.path.isfile(GPT2_BPE_FILE):
        raise DataError(f"{GPT2_BPE_FILE} is missing: restore it with 'git checkout data/gpt2.tiktoken'")
    if sha256_of(GPT2_BPE_FILE) != GPT2_BPE_SHA256:
        raise DataError(f"{GPT2_BPE_FILE} is not OpenAI's GPT-2 BPE file (sha256 differs): "
                        f"restore it with 'git checkout data/gpt2.tiktoken'")
    with open(GPT2_BPE_FILE, 'rb') as f:  # each line: base64 of a token's bytes, then its rank (= its id)
        ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}
    return tiktoken.Encoding(name='gpt2', pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': GPT2_EOT})


def char_tokenizer(chars):
    """Character-level: the id of a character is its position in chars."""
    stoi = {ch: i for i, ch in enumerate(chars)}

    def encode(text):
        unknown = sorted(set(text) - stoi.keys())
        if unknown:
            raise DataError(f"characters not in this model's vocabulary of {len(chars)}: "
                            f"{' '.join(repr(c) for c in unknown)}; use only characters of the training text")
        return [stoi[ch] for ch in text]

    def decode(ids):
        return ''.join(chars[i] for i in ids)

    return encode, decode


def load_meta(data_dir):
    """Read data/<name>/meta.json, or say which command makes it."""
    path = os.path.join(data_dir, 'meta.json')
    name = os.path.basename(os.path.normpath(data_dir))
    if not os.path.isfile(path):
        raise DataError(f"dataset '{name}' is not prepared ({path} is missing): "
                        f"run 'python prepare.py {name}' first")
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def load_tokenizer(meta):
    """(encode, decode) for the tokenizer a dataset's meta.json names."""
    kind = meta['tokenizer']['type']
    if kind == 'char':
        return char_tokenizer(meta['tokenizer']['chars'])
    if kind == 'gpt2':
        enc = gpt2_encoding()
        return enc.encode_ordinary, enc.decode
    raise DataError(f"unknown tokenizer type '{kind}' in meta.json")


# -----------------------------------------------------------------------------
# preparing a dataset

def read_source(source):
    """The text of a named corpus, downloaded first if it is not on disk."""
    path = source['path']
    if not os.path.isfile(path):
        print(f"downloading {source['url']} to {path}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with urllib.request.urlopen(source['url'], timeout=30) as r:
                content = r.read()
        except OSError as e:
            raise DataError(f"could not download {source['url']} ({e}); "
                            f"without internet access, put the file at {path} by hand")
        if hashlib.sha256(content).hexdigest() != source['sha256']:
            raise DataError(f"the file downloaded from {source['url']} is not the expected one (sha256 differs)")
        with open(path + '.tmp', 'wb') as f:
            f.write(content)
        os.replace(path + '.tmp', path)
    with open(path, encoding='utf-8') as f:
        return f.read()


def write_dataset(out_dir, splits, meta):
    """Write <split>.bin for each split (a list of ids) and meta.json. Each file is written under a
    temporary name and renamed when complete, so an interrupted run leaves no truncated file."""
    os.makedirs(out_dir, exist_ok=True)
    # uint16 holds ids up to 65,535: half the disk and memory of uint32. A larger vocabulary
    # switches to uint32, so an id never wraps around silently.
    dtype = 'uint16' if meta['vocab_size'] <= 2 ** 16 else 'uint32'
    meta = dict(meta, dtype=dtype)
    for split, ids in splits.items():
        path = os.path.join(out_dir, f'{split}.bin')
        np.array(ids, dtype=dtype).tofile(path + '.tmp')
        os.replace(path + '.tmp', path)
        meta[f'{split}_tokens'] = len(ids)
    path = os.path.join(out_dir, 'meta.json')
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    os.replace(path + '.tmp', path)
    return meta


def prepare(name):
    spec = DATASETS[name]
    text = read_source(spec['source'])
    # the first 90% of the text trains, the last 10% validates (nanoGPT's split)
    n = len(text)
    train_text, val_text = text[:int(n * 0.9)], text[int(n * 0.9):]
    if spec['tokenizer'] == 'char':
        chars = sorted(set(text))  # sorted, so ids are the same as nanoGPT's
        encode, _ = char_tokenizer(chars)
        tokenizer = dict(type='char', chars=chars)
        vocab_size, eot = len(chars), None
    else:
        enc = gpt2_encoding()
        encode = enc.encode_ordinary
        tokenizer = dict(type='gpt2')
        vocab_size, eot = enc.n_vocab, GPT2_EOT
    meta = dict(vocab_size=vocab_size, tokenizer=tokenizer, eot_id=eot)
    meta = write_dataset(os.path.join(DATA_DIR, name), dict(train=encode(train_text), val=encode(val_text)), meta)
    print(f"{name}: vocab {meta['vocab_size']:,}, {meta['train_tokens']:,} train and "
          f"{meta['val_tokens']:,} val tokens ({meta['dtype']}) in {os.path.join(DATA_DIR, name)}")


def main():
    parser = argparse.ArgumentParser(description="Tokenize a corpus into data/<name>/ for train.py.")
    parser.add_argument('dataset', choices=sorted(DATASETS), metavar='dataset',
                        help=f"one of: {', '.join(sorted(DATASETS))}")
    args = parser.parse_args()
    try:
        prepare(args.dataset)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == '__main__':
    main()
