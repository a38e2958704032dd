"""
prepare.py on the corpora learners use, offline: token counts and ids checked against the
tokenizer applied directly to each document, then train.py and sample.py on the result.
Fixture corpora are written by the tests; the hub is stood in for by a server on 127.0.0.1.
"""

import functools
import http.server
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from test_scripts import ROOT, TINY, assert_one_line_error, copy_scripts, run

sys.path.insert(0, ROOT)
import prepare  # noqa: E402
from tokenizer import gpt2_encoding, train_bpe  # noqa: E402

tokenizers = pytest.importorskip('tokenizers', reason='pip install -r requirements-test.txt')


@pytest.fixture
def repo(tmp_path):
    """A fresh copy of the repository's scripts and committed data (no prepared datasets)."""
    return copy_scripts(tmp_path / 'repo')


def read(repo, name, leftovers_allowed=False):
    data = repo / 'data' / name
    meta = json.loads((data / 'meta.json').read_text(encoding='utf-8'))
    ids = {s: np.fromfile(data / f'{s}.bin', dtype=meta['dtype']) for s in ('train', 'val')}
    assert [len(ids['train']), len(ids['val'])] == [meta['train_tokens'], meta['val_tokens']]
    assert leftovers_allowed or not [f for f in os.listdir(data) if f.endswith('.tmp')]
    return meta, ids


def stories(n, seed):
    """TinyStories-like documents: several paragraphs each, with blank lines inside."""
    rng = random.Random(seed)
    words = "Once upon a time there was a little girl named Lily . She liked to play in the park with her dog , Max ! " \
            "One day the sun was hot and they found a big red ball near the old tree ? \" Mom said .".split()
    return ['\n\n'.join(' '.join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(rng.randint(1, 4)))
            for _ in range(n)]


def tinystories_file(path, docs):
    """The real format: each story, then a line holding <|endoftext|>."""
    path.write_text(''.join(f"{d}\n<|endoftext|>\n" for d in docs), encoding='utf-8')


def expected_gpt2(docs):
    enc = gpt2_encoding()
    return [i for d in docs for i in enc.encode_ordinary(d) + [50256]]


def test_tinystories_local_files(repo, tmp_path):
    """Stories separated by <|endoftext|> lines: each story's GPT-2 ids, then 50256, exactly."""
    train_docs, val_docs = stories(300, 1), stories(30, 2)
    tinystories_file(tmp_path / 'train.txt', train_docs)
    tinystories_file(tmp_path / 'valid.txt', val_docs)
    run(repo, 'prepare.py', 'tinystories', f'--input={tmp_path / "train.txt"}', f'--val_input={tmp_path / "valid.txt"}')
    meta, ids = read(repo, 'tinystories')
    assert ids['train'].tolist() == expected_gpt2(train_docs)
    assert ids['val'].tolist() == expected_gpt2(val_docs)
    assert (meta['eot_id'], meta['dtype'], meta['tokenizer']) == (50256, 'uint16', {'type': 'gpt2'})


def test_tinystories_from_the_hub_honours_hf_endpoint(repo, tmp_path):
    """The real download code against a stand-in hub on 127.0.0.1, reached through HF_ENDPOINT."""
    hub = tmp_path / 'hub' / 'datasets' / 'roneneldan' / 'TinyStories' / 'resolve' / 'main'
    hub.mkdir(parents=True)
    train_docs, val_docs = stories(50, 3), stories(10, 4)
    tinystories_file(hub / 'TinyStoriesV2-GPT4-train.txt', train_docs)
    tinystories_file(hub / 'TinyStoriesV2-GPT4-valid.txt', val_docs)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / 'hub'))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = dict(os.environ, HF_ENDPOINT=f'http://127.0.0.1:{server.server_port}')
        p = subprocess.run([sys.executable, 'prepare.py', 'tinystories'], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert p.returncode == 0, p.stderr
    assert f'127.0.0.1:{server.server_port}' in p.stdout
    _, ids = read(repo, 'tinystories')
    assert ids['train'].tolist() == expected_gpt2(train_docs) and ids['val'].tolist() == expected_gpt2(val_docs)


def test_openwebtext_streams_from_parquet(tmp_path, monkeypatch):
    """openwebtext's route: the hub's parquet conversion, streamed through datasets, stood in for
    by a local folder of parquet files in the same layout. nanoGPT's 0.05 % split: with 4,000
    documents, numbers 1,999 and 3,999 validate; every document ends with 50256."""
    pq = pytest.importorskip('pyarrow.parquet', reason='pip install -r requirements-test.txt (datasets)')
    pytest.importorskip('datasets', reason='pip install -r requirements-test.txt')
    import pyarrow as pa
    docs = stories(4000, 11)
    (tmp_path / 'hub' / 'plain_text').mkdir(parents=True)
    pq.write_table(pa.table({'text': docs}), tmp_path / 'hub' / 'plain_text' / 'train-00000-of-00001.parquet')
    monkeypatch.setattr(prepare, 'DATA_DIR', str(tmp_path / 'data'))
    monkeypatch.setitem(prepare.DATASETS['openwebtext'], 'hub', str(tmp_path / 'hub'))
    meta = prepare.prepare('openwebtext', workers=2)
    data = tmp_path / 'data' / 'openwebtext'
    val = [d for i, d in enumerate(docs) if (i + 1) % 2000 == 0]
    train = [d for i, d in enumerate(docs) if (i + 1) % 2000 != 0]
    assert np.fromfile(data / 'val.bin', dtype=np.uint16).tolist() == expected_gpt2(val)
    assert np.fromfile(data / 'train.bin', dtype=np.uint16).tolist() == expected_gpt2(train)
    assert meta['eot_id'] == 50256 and meta['tokenizer'] == {'type': 'gpt2'}


def test_hub_unreachable_shows_the_local_route(repo):
    env = dict(os.environ, HF_ENDPOINT='http://127.0.0.1:9')  # nothing listens on port 9
    p = subprocess.run([sys.executable, 'prepare.py', 'tinystories'], cwd=repo, env=env, capture_output=True, text=True)
    assert_one_line_error(p, 'cannot download', '127.0.0.1:9', '--input')
    assert not os.path.exists(repo / 'data' / 'tinystories' / 'meta.json')
    assert not [f for f in os.listdir(repo / 'data' / 'tinystories') if f.endswith('.tmp')]


def test_chinese_characters_train_and_sample(repo, tmp_path):
    """A Chinese text with thousands of distinct characters, at character level: vocabulary, exact
    90/10 split of the bytes, then train a few steps and sample from a Chinese prompt."""
    rng = random.Random(0)
    hanzi = [chr(0x4E00 + i) for i in range(3000)]
    text = '\n'.join(''.join(rng.choice(hanzi) for _ in range(rng.randint(10, 60))) + '。' for _ in range(1500))
    text = '第一回　宴桃园豪杰三结义\n' + text
    (tmp_path / 'novel.txt').write_text(text, encoding='utf-8')
    run(repo, 'prepare.py', 'novel', f'--input={tmp_path / "novel.txt"}', '--tokenizer=char')
    meta, ids = read(repo, 'novel')
    chars = sorted(set(text))
    assert meta['vocab_size'] == len(chars) > 2900 and meta['tokenizer']['chars'] == chars
    # the last 10 % of the bytes validates, the cut moved forward to the start of a character
    raw = text.encode()
    cut = int(len(raw) * 0.9)
    cut = len(raw[:cut + next(i for i in range(4) if raw[cut + i] & 0xC0 != 0x80)].decode())
    assert ''.join(chars[i] for i in ids['train']) == text[:cut]
    assert ''.join(chars[i] for i in ids['val']) == text[cut:]
    assert meta['eot_id'] is None

    run(repo, 'train.py', *TINY, '--dataset=novel', '--max_iters=3', '--eval_interval=3', '--out_dir=out-novel')
    p = run(repo, 'sample.py', '--out_dir=out-novel', '--start=第一回', '--num_samples=1', '--max_new_tokens=10')
    assert p.stdout.startswith('第一回') and len(p.stdout.split('---------------')[0]) == 3 + 10 + 1


def test_new_bpe_tokenizer_on_a_folder(repo, tmp_path):
    """A byte-level BPE trained on a folder of documents (the training ones only): saved beside the
    data, ids equal to the tokenizer applied to each document, one document in ten validates;
    sample.py decodes it."""
    docs = stories(40, 5)
    (tmp_path / 'books' / 'more').mkdir(parents=True)
    for i, d in enumerate(docs):
        (tmp_path / 'books' / ('more' if i % 2 else '') / f'{i:03d}.txt').write_text(d, encoding='utf-8')
    for j, path in enumerate(sorted((tmp_path / 'books').rglob('*.txt'))):  # in the order prepare.py reads them
        if (j + 1) % 10 == 0:  # a validation document: give it a word no training document has
            path.write_text(path.read_text(encoding='utf-8') + ' Zyxwvut' * 30, encoding='utf-8')
    run(repo, 'prepare.py', 'books', f'--input={tmp_path / "books"}', '--tokenizer=bpe', '--vocab_size=400')
    meta, ids = read(repo, 'books')
    tok = tokenizers.Tokenizer.from_file(str(repo / 'data' / 'books' / 'tokenizer.json'))
    eot = tok.token_to_id('<|endoftext|>')
    assert meta['tokenizer'] == {'type': 'tokenizers', 'file': 'tokenizer.json'} and meta['eot_id'] == eot
    assert meta['vocab_size'] == tok.get_vocab_size() <= 400
    assert not any('xwv' in token for token in tok.get_vocab())  # the tokenizer learnt from train documents only
    files = sorted(str(p) for p in (tmp_path / 'books').rglob('*.txt'))  # the order prepare.py reads them
    texts = [open(f, encoding='utf-8').read() for f in files]
    enc = lambda ds: [i for d in ds for i in tok.encode(d, add_special_tokens=False).ids + [eot]]
    assert ids['train'].tolist() == enc([t for i, t in enumerate(texts) if (i + 1) % 10])
    assert ids['val'].tolist() == enc([t for i, t in enumerate(texts) if (i + 1) % 10 == 0])

    run(repo, 'train.py', *TINY, '--dataset=books', '--max_iters=2', '--eval_interval=2', '--out_dir=out-books')
    p = run(repo, 'sample.py', '--out_dir=out-books', '--start=Once upon', '--num_samples=1', '--max_new_tokens=8')
    assert p.stdout.startswith('Once upon')


def test_tokenizer_over_65536_ids_is_stored_as_uint32(repo, tmp_path):
    """A tokenizer.json with 70,000 tokens (a Qwen2-sized vocabulary needs the same): ids above
    65,535 survive the round trip through uint32 files, train.py reads them and sample.py decodes."""
    words = "the cat sat on a mat and saw big red sun".split()
    vocab = {f'filler{i}': i for i in range(70000 - len(words) - 2)}
    vocab.update({w: 70000 - len(words) - 2 + i for i, w in enumerate(words)})
    vocab.update({'[UNK]': 69998, '<|endoftext|>': 69999})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='[UNK]'))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(['<|endoftext|>'])
    (tmp_path / 'qwen').mkdir()
    tok.save(str(tmp_path / 'qwen' / 'tokenizer.json'))
    rng = random.Random(0)
    train_text, val_text = (' '.join(rng.choice(words) for _ in range(n)) for n in (3000, 300))
    (tmp_path / 'train.txt').write_text(train_text)
    (tmp_path / 'val.txt').write_text(val_text)
    run(repo, 'prepare.py', 'big', f'--input={tmp_path / "train.txt"}', f'--val_input={tmp_path / "val.txt"}',
        f'--tokenizer={tmp_path / "qwen"}')
    meta, ids = read(repo, 'big')
    assert (meta['vocab_size'], meta['dtype'], meta['eot_id']) == (70000, 'uint32', 69999)
    assert ids['train'].tolist() == tok.encode(train_text).ids + [69999]
    assert ids['val'].tolist() == tok.encode(val_text).ids + [69999]
    assert ids['train'].min() >= 65536 and tok.decode(ids['train'][:-1].tolist()) == train_text

    run(repo, 'train.py', *TINY, '--dataset=big', '--max_iters=2', '--eval_interval=2', '--out_dir=out-big')
    ckpt = torch.load(repo / 'out-big' / 'ckpt.pt', weights_only=True)
    assert ckpt['model_args']['vocab_size'] == 70016  # padded up to a multiple of 64
    # train.py reads the ids as uint32: a model that spreads its probability evenly over the 12 ids the
    # text uses (all above 65,535) has the loss ln 12 on both splits; read as uint16, each id would be two
    # ids (its low and high halves), none of them among the 12, at a loss of ~30. The model ignores its
    # input: ln_f outputs (1, 0, ..., 0) whatever comes in, which the tied wte = lm_head scores 30 for those ids.
    used = sorted(set(ids['train'].tolist()) | set(ids['val'].tolist()))
    assert len(used) == 12
    sd = ckpt['model']
    sd['transformer.ln_f.weight'].zero_()
    sd['transformer.ln_f.bias'].zero_()[0] = 1.0
    for name in ('transformer.wte.weight', 'lm_head.weight'):  # one tensor in the model; both names in the file
        sd[name][:, 0] = 0.0
        sd[name][used, 0] = 30.0
    torch.save(ckpt, repo / 'out-big' / 'last.pt')
    p = run(repo, 'train.py', *TINY, '--dataset=big', '--eval_only=True', '--init_from=resume', '--out_dir=out-big')
    losses = re.search(r'train loss ([0-9.]+), val loss ([0-9.]+)', p.stdout).groups()
    assert [float(v) for v in losses] == pytest.approx([math.log(12)] * 2, abs=1e-4), p.stdout
    p = run(repo, 'sample.py', '--out_dir=out-big', '--start=the cat', '--num_samples=1', '--max_new_tokens=5')
    assert p.stdout.startswith('the cat')


def test_workers_give_identical_files(repo, tmp_path):
    """Encoding on 2 processes writes the same bytes as on 1 (the order is kept); ~4 MB: 4 chunks."""
    tinystories_file(tmp_path / 'train.txt', stories(12000, 6))
    out = []
    for w in (1, 2):
        run(repo, 'prepare.py', 'tinystories', f'--input={tmp_path / "train.txt"}', f'--workers={w}')
        out.append([(repo / 'data' / 'tinystories' / f).read_bytes() for f in ('train.bin', 'val.bin', 'meta.json')])
    assert out[0] == out[1]
    meta, ids = read(repo, 'tinystories')
    assert len(ids['train']) + len(ids['val']) == len(expected_gpt2(stories(12000, 6)))


def test_chunks_encode_to_the_tokens_of_the_whole(tmp_path, monkeypatch):
    """A document without separators is cut at line ends where BPE pre-tokenizers always split:
    the chunks, encoded one by one, give exactly the ids of the whole text, for GPT-2 BPE and for
    a byte-level BPE of Hugging Face tokenizers. Chinese indentation (U+3000), no-break spaces,
    trailing spaces and blank lines are the hard cases."""
    rng = random.Random(9)
    pieces = ['Once upon a time', '  indented', '\u3000\u3000第一回', '他说。', 'a\u00a0b', 'end  ', '', '\t tab', "it's"]
    text = '\n'.join(rng.choice(pieces) + rng.choice(['', ' x', '!']) for _ in range(3000))
    path = tmp_path / 'doc.txt'
    path.write_text(text, encoding='utf-8')
    raw = path.read_bytes()
    monkeypatch.setattr(prepare, 'CHUNK_BYTES', 200)
    cuts = prepare.chunks(str(path), None, 0, len(raw))
    assert len(cuts) > 50 and cuts[0][0] == 0 and cuts[-1][1] == len(raw)
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))  # contiguous
    parts = [raw[s:e].decode() for s, e, _ in cuts]
    enc = gpt2_encoding()
    assert [i for p in parts for i in enc.encode_ordinary(p)] == enc.encode_ordinary(text)
    bpe = train_bpe([text], 500, str(tmp_path / 'tok.json'))
    assert [i for p in parts for i in bpe.encode(p).ids] == bpe.encode(text).ids


# prepare.py as a user runs it, but killed (SIGKILL: no clean-up can run) at a known point of its work
KILLED_AT = """
import os, signal, sys
import prepare
where, sys.argv = sys.argv[1], ['prepare.py', *sys.argv[2:]]
prepare.CHUNK_BYTES = 4096  # a small file in many chunks
run_tasks, replace = prepare.run_tasks, os.replace
def killing_run_tasks(fn, tasks, workers, init):
    for i, result in enumerate(run_tasks(fn, tasks, workers, init)):
        if where == 'first chunk' and fn is prepare._encode_task and i == 1:  # chunk 0 went to train.bin.tmp
            os.kill(os.getpid(), signal.SIGKILL)
        yield result
def killing_replace(src, dst):  # the new files are complete, the old meta.json removed, none renamed yet
    if where == 'renames':
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)
prepare.run_tasks, os.replace = killing_run_tasks, killing_replace
prepare.main()
"""


@pytest.mark.parametrize('where', ['first chunk', 'renames'])
def test_killed_run_leaves_the_old_dataset_intact(repo, tmp_path, where):
    """SIGKILL while re-preparing, after the first chunk is written: the old dataset is whole and
    meta.json still describes it. SIGKILL just before the new files are renamed into place: the
    old meta.json is already gone (it must never describe the new files), and train.py refuses in one
    line, naming the command that mends it, rather than take the .bin files for a nanoGPT folder (GPT-2
    ids); that command then completes and leaves no temporary file behind."""
    tinystories_file(tmp_path / 'small.txt', stories(100, 7))
    run(repo, 'prepare.py', 'tinystories', f'--input={tmp_path / "small.txt"}')
    old_meta, old_ids = read(repo, 'tinystories')
    tinystories_file(tmp_path / 'large.txt', stories(300, 8))  # ~100 KB: ~25 chunks of 4 KB
    new = ['tinystories', f'--input={tmp_path / "large.txt"}', '--workers=1']
    p = subprocess.run([sys.executable, '-c', KILLED_AT, where, *new], cwd=repo, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    data = repo / 'data' / 'tinystories'
    assert (data / 'train.bin.tmp').exists()  # killed in the middle of the work, as meant
    if where == 'first chunk':
        meta, ids = read(repo, 'tinystories', leftovers_allowed=True)  # SIGKILL leaves the .tmp files
        assert meta == old_meta and all(np.array_equal(ids[s], old_ids[s]) for s in ids)
    else:
        assert not (data / 'meta.json').exists()
        assert_one_line_error(run(repo, 'train.py', *TINY, '--dataset=tinystories', '--max_iters=1', ok=False),
                              'half prepared', "'python prepare.py tinystories' again")
    run(repo, 'prepare.py', *new)
    meta, _ = read(repo, 'tinystories')  # whole, and no .tmp file left
    assert meta['train_tokens'] > old_meta['train_tokens']


@pytest.mark.parametrize('setup, args, fragments', [
    (None, ['--input=missing.txt'], ["'missing.txt'", 'no file']),
    ('empty', ['--input=empty.txt'], ['no text', 'empty.txt']),
    ('latin1', ['--input=latin1.txt'], ['latin1.txt', 'not UTF-8', '0xe9 at offset 9', '--errors=replace']),
    (None, ['--tokenizer=nope.json', '--input=README.md'], ['nope.json', 'char, gpt2, bpe']),
    (None, ['--val_fraction=1.5', '--input=README.md'], ['val_fraction']),
    ('no-tokenizers', ['--input=README.md', '--tokenizer=bpe'], ['pip install tokenizers']),
    (None, [], ["unknown dataset 'mine'", 'shakespeare_char', 'tinystories', '--input']),
])
def test_bad_input(repo, setup, args, fragments):
    """One line, a non-zero exit, and nothing written."""
    env = dict(os.environ)
    if setup == 'empty':
        (repo / 'empty.txt').write_text('')
    if setup == 'latin1':
        (repo / 'latin1.txt').write_bytes('Hello Ren\u00e9e'.encode('latin-1'))  # é: byte 0xe9, offset 9
    if setup == 'no-tokenizers':  # a tokenizers module that fails to import, as if not installed
        (repo / 'blocked').mkdir()
        (repo / 'blocked' / 'tokenizers.py').write_text("raise ImportError('not installed')\n")
        env['PYTHONPATH'] = str(repo / 'blocked')
    shutil.copy(os.path.join(ROOT, 'README.md'), repo)
    p = subprocess.run([sys.executable, 'prepare.py', 'mine', *args], cwd=repo, env=env, capture_output=True, text=True)
    assert_one_line_error(p, *fragments)
    assert not os.path.exists(repo / 'data' / 'mine' / 'meta.json')


def test_replace_bad_bytes_and_short_splits(repo):
    """--errors=replace turns bad bytes into U+FFFD; a split shorter than a block is warned about
    by prepare.py and refused by train.py, naming the split, its size and the block size."""
    (repo / 'tiny.txt').write_bytes('Hello Ren\u00e9e, how are you today?'.encode('latin-1'))
    p = run(repo, 'prepare.py', 'tiny', '--input=tiny.txt', '--tokenizer=char', '--errors=replace')
    assert 'warning: the val split has only 4 tokens' in p.stdout
    meta, _ = read(repo, 'tiny')
    assert '\ufffd' in meta['tokenizer']['chars']
    p = run(repo, 'train.py', *TINY, '--dataset=tiny', ok=False)
    assert_one_line_error(p, 'val split', '4 tokens', 'block_size + 1 = 17')


def test_sample_stops_at_end_of_text(repo, tmp_path):
    """With stop_at_eot (the default) a sample ends at the end-of-text token; without, it goes on."""
    tinystories_file(tmp_path / 'train.txt', stories(200, 9))
    run(repo, 'prepare.py', 'tinystories', f'--input={tmp_path / "train.txt"}')
    run(repo, 'train.py', *TINY, '--dataset=tinystories', '--max_iters=1', '--eval_interval=1', '--out_dir=out-eot')
    ckpt_path = repo / 'out-eot' / 'ckpt.pt'
    ckpt = torch.load(ckpt_path, weights_only=True)
    # make the model always predict 50256: final norm outputs a fixed vector, aligned with its row
    sd = ckpt['model']
    sd['transformer.ln_f.weight'].zero_()
    sd['transformer.ln_f.bias'].fill_(1.0)
    sd['lm_head.weight'][50256] = 10.0  # tied: the same tensor as transformer.wte.weight
    torch.save(ckpt, ckpt_path)
    args = ['--out_dir=out-eot', '--start=Once', '--num_samples=1', '--max_new_tokens=5', '--temperature=0']
    assert run(repo, 'sample.py', *args).stdout == 'Once\n---------------\n'
    assert run(repo, 'sample.py', *args, '--stop_at_eot=False').stdout.startswith('Once<|endoftext|><|endoftext|>')
