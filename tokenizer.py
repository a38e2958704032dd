"""
Every tokenizer the project knows, and the meta.json that says which one a dataset uses.

    from tokenizer import load_meta, load_tokenizer
    meta = load_meta('data/shakespeare_char')            # vocab_size 65, dtype uint16, the 65 characters
    tok = load_tokenizer(meta, 'data/shakespeare_char')
    tok.encode('ROMEO:'), tok.decode([30, 27, 25, 17, 27, 10])

A tokenizer is described by a small dict, meta.json's "tokenizer":

    {"type": "char", "chars": [...]}                     id i is chars[i]
    {"type": "gpt2"}                                     GPT-2's BPE, from the committed data/gpt2.tiktoken
    {"type": "tokenizers", "file": "tokenizer.json"}     a Hugging Face tokenizers file beside the data

prepare.py writes datasets with them; train.py, sample.py, export_hf.py and checkpoint.py read them.
Nothing here downloads, and reading a dataset never runs code (JSON; nanoGPT's meta.pkl as plain data).
"""

import base64
import hashlib
import json
import os
import pickle

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')

# OpenAI's GPT-2 BPE merge ranks, committed so that no download is needed: byte for byte the r50k_base
# file tiktoken fetches for its 'gpt2' encoding, with its sha256
GPT2_BPE_FILE = os.path.join(DATA_DIR, 'gpt2.tiktoken')
GPT2_BPE_SHA256 = '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930'
# GPT-2's pre-tokenisation pattern, in the faster equivalent form tiktoken uses (tiktoken_ext/openai_public.py)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT = 50256  # <|endoftext|>
EOT_NAMES = ('<|endoftext|>', '</s>', '<|end_of_text|>', '<eos>')  # end-of-text tokens of common tokenizers


class DataError(Exception):
    """A problem with the user's data or files: the scripts print its message in one line and exit."""


def need(module, pip_name):
    """Import an optional library, or say which pip install gives it."""
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"this needs the '{pip_name}' library: pip install {pip_name}") from None


def gpt2_encoding():
    """tiktoken's GPT-2 encoding from the committed file (tiktoken.get_encoding('gpt2') would download it)."""
    tiktoken = need('tiktoken', 'tiktoken')
    with open(GPT2_BPE_FILE, 'rb') as f:
        contents = f.read()
    if hashlib.sha256(contents).hexdigest() != GPT2_BPE_SHA256:
        raise DataError(f"{GPT2_BPE_FILE} is not OpenAI's GPT-2 BPE file: restore it with 'git checkout data/gpt2.tiktoken'")
    # each line: base64 of a token's bytes, then its rank, which is its id
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in contents.splitlines() if line)}
    return tiktoken.Encoding(name='gpt2', pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': GPT2_EOT})


def hf_tokenizer(path):
    """A Hugging Face tokenizers file (tokenizer.json), or a DataError naming it."""
    tokenizers = need('tokenizers', 'tokenizers')
    try:
        return tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # missing, or not a tokenizer file
        raise DataError(f"cannot read the tokenizer {path} ({type(e).__name__}: {e})") from None


def eot_of(tok):
    """The end-of-text id of a tokenizers Tokenizer, under any of the common names; None if it has none."""
    return next((i for i in map(tok.token_to_id, EOT_NAMES) if i is not None), None)


class Tokenizer:
    """One dataset's tokenizer: encode(text) -> list of ids, decode(ids) -> text; eot is the
    end-of-text id that separates documents (None where the tokenizer has none, or for a single text)."""

    def __init__(self, spec, data_dir='.', eot=None):
        self.spec, self.eot = spec, eot
        kind = spec['type']
        if kind == 'char':
            self.chars = spec['chars']
            self.stoi = {ch: i for i, ch in enumerate(self.chars)}
            self.n_vocab = len(self.chars)
        elif kind == 'gpt2':
            self.enc = gpt2_encoding()
            self.n_vocab = self.enc.n_vocab
        elif kind == 'tokenizers':
            self.tok = hf_tokenizer(os.path.join(data_dir, spec['file']))
            self.n_vocab = self.tok.get_vocab_size()
        else:
            raise DataError(f"unknown tokenizer type '{kind}' in {data_dir}/meta.json")

    def encode(self, text):
        kind = self.spec['type']
        if kind == 'char':
            unknown = sorted(set(text) - self.stoi.keys())
            if unknown:
                raise DataError(f"characters not in this model's vocabulary of {len(self.chars)}: "
                                f"{' '.join(repr(c) for c in unknown)}; use only characters of the training text")
            return [self.stoi[ch] for ch in text]
        if kind == 'gpt2':
            return self.enc.encode_ordinary(text)  # ordinary: '<|endoftext|>' in a text is plain text
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        kind = self.spec['type']
        if kind == 'char':
            return ''.join(self.chars[i] for i in ids)
        return self.enc.decode(ids) if kind == 'gpt2' else self.tok.decode(ids)

    def array_encoder(self):
        """encode(text) -> array of uint32 ids: the fastest way of each tokenizer, for large corpora."""
        if self.spec['type'] != 'char':
            return lambda text: np.array(self.encode(text), dtype=np.uint32)
        # characters -> ids with one table lookup: the text's code points index a table of ids
        table = np.zeros(max(map(ord, self.chars)) + 1, dtype=np.uint32)
        table[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        return lambda text: table[np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32)]


def gpt2_tokenizer():
    """GPT-2's own BPE, for GPT-2's weights (documents end with <|endoftext|>, 50256)."""
    return Tokenizer(dict(type='gpt2'), eot=GPT2_EOT)


def load_tokenizer(meta, data_dir):
    """The Tokenizer a dataset's meta.json describes (data_dir holds its tokenizer.json, if any)."""
    return Tokenizer(meta['tokenizer'], data_dir, meta.get('eot_id'))


class PlainUnpickler(pickle.Unpickler):
    """Plain data only (dicts, lists, str, int, ...): a class a pickle names is refused, as loading it can run code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}, and only plain data is read")


def load_meta(data_dir):
    """Read data/<name>/meta.json, or say which command makes it. A folder prepared by nanoGPT works too: its
    meta.pkl (characters) is read as plain data; without one, its .bin files hold GPT-2 BPE ids as uint16."""
    path = os.path.join(data_dir, 'meta.json')
    name = os.path.basename(os.path.normpath(data_dir))
    if os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    # prepare.py killed after removing the old meta.json, before renaming the new one into place: the .bin
    # files beside it are not a nanoGPT folder's (GPT-2 ids as uint16, below), whatever they hold
    if os.path.isfile(path + '.tmp'):
        raise DataError(f"dataset '{name}' is half prepared (prepare.py was stopped while renaming its files): "
                        f"run 'python prepare.py {name}' again, with the same options")
    bins = [os.path.join(data_dir, f'{s}.bin') for s in ('train', 'val')]
    if not all(map(os.path.isfile, bins)):
        raise DataError(f"dataset '{name}' is not prepared ({path} is missing): run 'python prepare.py {name}' "
                        f"(or 'python prepare.py {name} --input=YOUR_TEXT') first")
    counts = dict(train_tokens=os.path.getsize(bins[0]) // 2, val_tokens=os.path.getsize(bins[1]) // 2)
    pkl = os.path.join(data_dir, 'meta.pkl')
    if not os.path.isfile(pkl):
        return dict(vocab_size=50257, dtype='uint16', tokenizer=dict(type='gpt2'), eot_id=GPT2_EOT, **counts)
    try:
        with open(pkl, 'rb') as f:
            old = PlainUnpickler(f).load()
        chars = [old['itos'][i] for i in range(old['vocab_size'])]
    except Exception as e:  # not a pickle, another layout, or objects that are not plain data
        raise DataError(f"cannot read {pkl} as nanoGPT's character vocabulary ({type(e).__name__}: {e}): "
                        f"prepare the data again with 'python prepare.py {name} --input=...'") from None
    return dict(vocab_size=len(chars), dtype='uint16', tokenizer=dict(type='char', chars=chars), eot_id=None, **counts)
