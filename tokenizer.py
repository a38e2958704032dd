"""
Every tokenizer the project knows, and the meta.json that says which one a dataset uses.

    from tokenizer import load_meta, load_tokenizer
    meta = load_meta('data/shakespeare_char')  # vocab_size 65, dtype uint16, the 65 characters
    tok = load_tokenizer(meta, 'data/shakespeare_char')
    tok.encode('ROMEO:'), tok.decode([30, 27, 25, 17, 27, 10])

A tokenizer is described by a small dict, meta.json's "tokenizer":

    {"type": "char", "chars": [...]}                  id i is chars[i]
    {"type": "gpt2"}                                  GPT-2's BPE (the committed data/gpt2.tiktoken)
    {"type": "tokenizers", "file": "tokenizer.json"}  a Hugging Face tokenizers file beside the data

A chat dataset's meta.json adds "chat", its template (conversations.py): our markers, whose ids
follow every id of the tokenizer, or a model's own Jinja template; the Tokenizer knows their ids
(special, special_ids, stop_ids) and conversations.py lays conversations out with them.

prepare.py writes datasets with them, making new tokenizers (train_bpe, tokenizers_file) here;
train.py, sample.py, chat.py, eval.py, export_hf.py and checkpoint.py read them. token_bytes()
says how many UTF-8 bytes of text each id stands for, which bits per byte divides by. Nothing here
downloads (downloads.py does), and reading a dataset never runs code (JSON; nanoGPT's meta.pkl as
plain data).
"""

import base64
import glob
import hashlib
import json
import os
import pickle
import re

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')

# OpenAI's GPT-2 BPE merge ranks, committed so that no download is needed: byte for byte the
# r50k_base file tiktoken fetches for its 'gpt2' encoding, with its sha256
GPT2_BPE_FILE = os.path.join(DATA_DIR, 'gpt2.tiktoken')
GPT2_BPE_SHA256 = '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930'
# GPT-2's pre-tokenisation pattern, in the faster equivalent form tiktoken uses
# (tiktoken_ext/openai_public.py)
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$"""
                r"""|\s+(?!\S)|\s""")
GPT2_EOT = 50256  # <|endoftext|>
# end-of-text tokens of common tokenizers
EOT_NAMES = ('<|endoftext|>', '</s>', '<|end_of_text|>', '<eos>')


class DataError(ValueError):
    """A problem with the user's data or files: the scripts print its message in one
    line and exit."""


def need(module, pip_name):
    """Import an optional library, or say which pip install gives it."""
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"this needs the '{pip_name}' library: pip install {pip_name}") from None


def find_files(pattern, exts=('.txt',)):
    """The files of --input: a file, a folder (every file in it ending in exts, recursively)
    or a glob."""
    if os.path.isfile(pattern):
        return [pattern]
    found = [f for e in exts
             for f in glob.glob(os.path.join(pattern, '**', '*' + e), recursive=True)] \
        if os.path.isdir(pattern) else glob.glob(pattern, recursive=True)
    files = sorted(f for f in found if os.path.isfile(f))
    if not files:
        raise DataError(f"--input '{pattern}' is no file, and no {' or '.join(exts)} files "
                        f"match it")
    return files


def gpt2_encoding():
    """tiktoken's GPT-2 encoding from the committed file (tiktoken.get_encoding('gpt2') would
    download it)."""
    tiktoken = need('tiktoken', 'tiktoken')
    with open(GPT2_BPE_FILE, 'rb') as f:
        contents = f.read()
    if hashlib.sha256(contents).hexdigest() != GPT2_BPE_SHA256:
        raise DataError(f"{GPT2_BPE_FILE} is not OpenAI's GPT-2 BPE file: restore it with "
                        f"'git checkout data/gpt2.tiktoken'")
    # each line: base64 of a token's bytes, then its rank, which is its id
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in contents.splitlines() if line)}
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
    """The end-of-text id of a tokenizers Tokenizer, under any of the common names; None if
    it has none."""
    return next((i for i in map(tok.token_to_id, EOT_NAMES) if i is not None), None)


def byte_to_unicode():
    """GPT-2's spelling of bytes as printable characters, which byte-level BPE files (vocab.json,
    merges.txt, tokenizer.json) use: the 188 printable Latin-1 bytes stand for themselves, the 68
    others (space, newline, controls, ...) for chr(256), chr(257), ... in byte order (OpenAI's
    encoder.py, bytes_to_unicode)."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
                 *range(ord('®'), ord('ÿ') + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


class Tokenizer:
    """One dataset's tokenizer: encode(text) -> list of ids, decode(ids) -> text; eot is the
    end-of-text id that separates documents (None where the tokenizer has none, or for
    a single text)."""

    def __init__(self, spec, data_dir='.', eot=None, chat=None):
        self.spec, self.eot, self.chat = spec, eot, chat
        self._token_bytes = None  # token_bytes(), computed at the first call
        kind = spec['type']
        # special_ids: the ids that stand for no text (end-of-text, chat markers); bits per byte
        # counts them as 0 bytes and leaves their loss out. A tokenizer that appends special tokens
        # adds their ids here.
        self.special_ids = set() if eot is None else {eot}
        if kind == 'char':
            self.chars = spec['chars']
            self.stoi = {ch: i for i, ch in enumerate(self.chars)}
            self.n_vocab = len(self.chars)
        elif kind == 'gpt2':
            self.enc = gpt2_encoding()
            self.n_vocab = self.enc.n_vocab
            self.special_ids.add(GPT2_EOT)  # whether or not the dataset uses it: it is no text
        elif kind == 'tokenizers':
            self.tok = hf_tokenizer(os.path.join(data_dir, spec['file']))
            self.n_vocab = self.tok.get_vocab_size()
            self.added = {i: t.content for i, t in self.tok.get_added_tokens_decoder().items()}
            self.special_ids |= {i for i, t in self.tok.get_added_tokens_decoder().items()
                                 if t.special}
            # with our chat template, the file's own special tokens (<|endoftext|>) typed in a
            # message are text too; a model's own template is text that holds them
            self.tok.encode_special_tokens = chat is not None and 'jinja' not in chat
            # a byte-level BPE spells each byte as one printable character: {character: byte}
            decoder = json.dumps(json.loads(self.tok.to_str()).get('decoder'))
            self.byte_level = ({c: b for b, c in byte_to_unicode().items()}
                               if '"ByteLevel"' in decoder else None)
        else:
            raise DataError(f"unknown tokenizer type '{kind}' in {data_dir}/meta.json")
        # our chat template's markers, {name: id}, after every id of the tokenizer: ids that stand
        # for no text too (special_ids), which decode shows by name; or a model's own template
        # (Jinja: conversations.py), which ends a reply at one of its stop ids
        self.special = dict(chat['tokens']) if chat and 'tokens' in chat else {}
        self.template = chat['jinja'] if chat and 'jinja' in chat else None
        self.special_ids |= set(self.special.values())
        self.special_names = {i: name for name, i in self.special.items()}
        self.n_vocab = max([self.n_vocab - 1, *self.special.values()]) + 1
        self.stop_ids = set(chat['stop']) if self.template else self.special_ids

    def encode(self, text):
        kind = self.spec['type']
        if kind == 'char':
            unknown = sorted(set(text) - self.stoi.keys())
            if unknown:
                raise DataError(f"characters not in this model's vocabulary of {len(self.chars)}: "
                                f"{' '.join(repr(c) for c in unknown)}; use only characters of the "
                                f"training text")
            return [self.stoi[ch] for ch in text]
        if kind == 'gpt2':
            # ordinary: '<|endoftext|>' in a text is plain text
            return self.enc.encode_ordinary(text)
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_special(self, text):
        """Ids of text in which the tokenizer's special tokens are found by name (a rendered chat
        template's, whose markers are such tokens), as transformers encodes it."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        # the markers by name, the runs between decoded
        if self.special_names and self.special_names.keys() & set(ids):
            out, run = [], []
            for i in list(ids) + [None]:
                if i is None or i in self.special_names:
                    out += [self.decode(run)] + ([self.special_names[i]] if i is not None else [])
                    run = []
                else:
                    run.append(i)
            return ''.join(out)
        kind = self.spec['type']
        if kind == 'char':
            return ''.join(self.chars[i] for i in ids)
        return self.enc.decode(ids) if kind == 'gpt2' else self.tok.decode(ids)

    def token_bytes(self):
        """(n_vocab,) int32 array: how many UTF-8 bytes of text each id stands for, 0 for
        special_ids; computed once. Summed over the ids encode(text) gives, it is
        len(text.encode('utf-8')): bits per byte's divisor."""
        if self._token_bytes is None:
            self._token_bytes = np.array([0 if i in self.special_ids else len(self.piece(i))
                                          for i in range(self.n_vocab)], dtype=np.int32)
        return self._token_bytes

    def piece(self, i):
        """The bytes of text id i stands for (a special token's: its name), the same whatever the
        kind of tokenizer: so two tokenizers can be compared id by id (checkpoint.fit_vocab)."""
        if i in self.special_names:
            return self.special_names[i].encode('utf-8')
        kind = self.spec['type']
        if kind == 'char':
            return self.chars[i].encode('utf-8')
        if kind == 'gpt2':  # a token may be part of a character: an emoji is 2 or 3 tokens
            return self.enc.decode_single_token_bytes(i)
        if i in self.added:  # the file's added tokens: their text as it is
            return self.added[i].encode('utf-8')
        token = self.tok.id_to_token(i) or ''
        if self.byte_level:  # GPT-2's kind, Qwen's, prepare.py's bpe: one character per byte
            return b''.join(bytes([self.byte_level[c]]) if c in self.byte_level else c.encode()
                            for c in token)
        # SentencePiece's conventions (Llama 2, TinyLlama): '<0x0A>' is a byte, '\u2581' a space
        if re.fullmatch(r'<0x[0-9A-Fa-f]{2}>', token):
            return bytes([int(token[3:5], 16)])
        return token.replace('\u2581', ' ').encode('utf-8')

    def array_encoder(self):
        """encode(text) -> array of uint32 ids: the fastest way of each tokenizer,
        for large corpora."""
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
    return Tokenizer(meta['tokenizer'], data_dir, meta.get('eot_id'), meta.get('chat'))


class PlainUnpickler(pickle.Unpickler):
    """Plain data only (dicts, lists, str, int, ...): a class a pickle names is refused, as loading
    it can run code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}, and only plain data is read")


# what every meta.json holds
META_KEYS = ('vocab_size', 'dtype', 'train_tokens', 'val_tokens', 'tokenizer')


def remake(name):
    """The prepare.py command that writes data/<name>/ again, for a message."""
    return f"'python prepare.py {name}' (with --input=YOUR_TEXT for your own text)"


def load_meta(data_dir):
    """Read data/<name>/meta.json, or say which command makes it. A folder prepared by nanoGPT works
    too: its meta.pkl (characters) is read as plain data; without one, its .bin files hold GPT-2 BPE
    ids as uint16. A file that is not JSON, lacks a key or has a dtype .bin files cannot have is a
    DataError naming it."""
    path = os.path.join(data_dir, 'meta.json')
    name = os.path.basename(os.path.normpath(data_dir))
    if os.path.isfile(path):
        try:
            with open(path, encoding='utf-8') as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            # unreadable, not UTF-8, not JSON (JSONDecodeError is a ValueError)
            raise DataError(f"{path} is unreadable ({type(e).__name__}: {e}): remake it with "
                            f"{remake(name)}") from None
        missing = ([k for k in META_KEYS if k not in meta] if isinstance(meta, dict)
                   else list(META_KEYS))
        if missing:
            have = ', '.join(meta) if isinstance(meta, dict) else f'a {type(meta).__name__}'
            raise DataError(f"{path} lacks {', '.join(missing)} (it has {have or 'nothing'}): "
                            f"remake it with {remake(name)}")
        if meta['dtype'] not in ('uint16', 'uint32'):
            raise DataError(f"{path} says dtype {meta['dtype']!r}, expected 'uint16' or 'uint32': "
                            f"remake it with {remake(name)}")
        return meta
    # prepare.py killed after removing the old meta.json, before renaming the new one into place:
    # the .bin files beside it are not a nanoGPT folder's (GPT-2 ids as uint16, below), whatever
    # they hold
    if os.path.isfile(path + '.tmp'):
        raise DataError(f"dataset '{name}' is half prepared (prepare.py was stopped while renaming "
                        f"its files): run 'python prepare.py {name}' again, with the same options")
    bins = [os.path.join(data_dir, f'{s}.bin') for s in ('train', 'val')]
    if not all(map(os.path.isfile, bins)):
        raise DataError(f"dataset '{name}' is not prepared ({path} is missing): run "
                        f"'python prepare.py {name}' "
                        f"(or 'python prepare.py {name} --input=YOUR_TEXT') first")
    counts = dict(train_tokens=os.path.getsize(bins[0]) // 2,
                  val_tokens=os.path.getsize(bins[1]) // 2)
    pkl = os.path.join(data_dir, 'meta.pkl')
    if not os.path.isfile(pkl):
        return dict(vocab_size=50257, dtype='uint16', tokenizer=dict(type='gpt2'), eot_id=GPT2_EOT,
                    **counts)
    try:
        with open(pkl, 'rb') as f:
            old = PlainUnpickler(f).load()
        chars = [old['itos'][i] for i in range(old['vocab_size'])]
    except Exception as e:  # not a pickle, another layout, or objects that are not plain data
        raise DataError(f"cannot read {pkl} as nanoGPT's character vocabulary "
                        f"({type(e).__name__}: {e}): prepare the data again with "
                        f"'python prepare.py {name} --input=...'") from None
    return dict(vocab_size=len(chars), dtype='uint16', tokenizer=dict(type='char', chars=chars),
                eot_id=None, **counts)


def check_bins(data_dir, meta, splits=('train', 'val')):
    """Each <split>.bin is there and holds exactly the tokens meta.json counts: a copy cut short (of
    any size, odd or even) or a file from another preparation is a DataError naming it, not garbage
    batches. A chat dataset's <split>_mask.bin (a byte per token) and <split>_starts.bin (a uint64
    per conversation) too."""
    name = os.path.basename(os.path.normpath(data_dir))
    for split in splits:
        files = [(f'{split}.bin', meta[f'{split}_tokens'], meta['dtype'], 'tokens')]
        if 'chat' in meta:
            files += [(f'{split}_mask.bin', meta[f'{split}_tokens'], 'uint8', 'mask bytes'),
                      (f'{split}_starts.bin', meta[f'{split}_conversations'], 'uint64',
                       'conversation starts')]
        for file, count, dtype, what in files:
            path, want = os.path.join(data_dir, file), count * np.dtype(dtype).itemsize
            if not os.path.isfile(path):
                raise DataError(f"{path} is missing: remake it with {remake(name)}")
            # (nanoGPT's folders have no meta.json: there, only an odd size is caught)
            if os.path.getsize(path) != want:
                raise DataError(f"{path} has {os.path.getsize(path):,} bytes, expected {count:,} "
                                f"{dtype} {what} = {want:,} bytes (a copy cut short?): remake it "
                                f"with {remake(name)}")


def load_dataset(name):
    """(meta, tokenizer) of the prepared dataset data/<name>: meta.json read whole, each .bin
    checked to hold what it says (check_bins), and the tokenizer it was made with;
    else a DataError."""
    data_dir = os.path.join(DATA_DIR, name)
    meta = load_meta(data_dir)
    check_bins(data_dir, meta)
    return meta, load_tokenizer(meta, data_dir)


# -----------------------------------------------------------------------------
# new tokenizers, for prepare.py's datasets


def train_bpe(texts, vocab_size, path):
    """Train a byte-level BPE tokenizer (GPT-2's kind) on the text with Hugging Face tokenizers."""
    tk = need('tokenizers', 'tokenizers')
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>'],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(path)
    return tok


def tokenizers_file(tokenizer, texts, vocab_size, path):
    """A Hugging Face tokenizers Tokenizer, saved at path: for 'bpe' a byte-level BPE of vocab_size
    tokens trained on texts() (train_bpe); else the file tokenizer names (a tokenizer.json, or a
    folder holding one)."""
    if tokenizer == 'bpe':
        return train_bpe(texts(), vocab_size, path)
    tok = hf_tokenizer(os.path.join(tokenizer, 'tokenizer.json') if os.path.isdir(tokenizer)
                       else tokenizer)
    tok.save(path)
    return tok
