"""
Bits per byte and HellaSwag, checked against independent computations: the bytes per token of every
tokenizer against the text's UTF-8 length, HellaSwag's predictions and accuracies against transformers'
GPT2LMHeadModel on a tiny random GPT-2, 2 Gloo processes against 1, bpb against loss / ln 2 where every
character is 1 byte (and a third of it where every character is 3), train.py's log and plot, and the
one-line answers to bad input. eval.py and train.py run as subprocesses on tiny models, as a user runs them.
"""

import contextlib
import json
import math
import os
import re
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip('transformers')  # a test requirement (requirements-test.txt), not a core one
from transformers import GPT2LMHeadModel  # noqa: E402

from hf_models import from_pretrained  # noqa: E402
from scoring import ending_losses, hellaswag_file, read_hellaswag, render_hellaswag, score_sums  # noqa: E402
from test_hf import one_thread, tiny_hf  # noqa: E402,F401 (one_thread is an autouse fixture)
from test_scripts import TINY, assert_one_line_error, repo, run  # noqa: E402,F401 (repo is a fixture)
from tokenizer import GPT2_EOT, DataError, Tokenizer, gpt2_encoding, gpt2_tokenizer  # noqa: E402

LN2 = math.log(2)
EN, ZH, EMOJI = "The quick brown fox jumps over the lazy dog.", "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。", "😀🎉"
MIXED = (EN + "\n" + ZH + EMOJI + "\n") * 40  # a character model's training text: 1, 3 and 4 bytes per character
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
CPU = ['--device=cpu', '--dtype=float32']


def hellaswag_item(i, ctx, endings, label):
    """An item in the official format (github.com/rowanz/hellaswag, data/hellaswag_val.jsonl)."""
    return json.dumps(dict(ind=i, activity_label="Test", ctx_a=ctx, ctx_b="", ctx=ctx, split="val",
                           split_type="indomain", label=label, endings=endings, source_id=f"test~{i}"))


# endings of very different lengths, so that the summed loss (acc) and the mean loss (acc_norm) disagree
ITEMS = [
    ("A man is sitting on a roof. He", ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                        "is holding a rubik's cube.", "starts pulling up roofing on a roof."], 3),
    ("A woman pours flour into a bowl. She", ["stirs.", "adds two eggs and a cup of milk, then whisks it all "
                                              "together until smooth.", "sings.", "reads a book about the sea."], 1),
    ("The dog runs to the ball and", ["barks.", "picks it up in its mouth and brings it back to the boy.",
                                      "flies.", "eats the grass"], 1),
    ("Two kids are playing chess. One of them", ["moves a pawn forward.", "cries.", "laughs loudly at the board "
                                                 "and then knocks every piece to the floor.", "wins."], 0),
    ("A chef slices onions on a board. Then he", ["puts them in a hot pan with butter.", "dances.",
                                                  "sleeps.", "throws the knife into the river and walks away."], 0),
]


def write_hellaswag(path, items=ITEMS):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(hellaswag_item(i, *item) + '\n' for i, item in enumerate(items)), encoding='utf-8')
    return path


def torchrun(repo, *args):
    p = subprocess.run([*TORCHRUN, *args], cwd=repo, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}"
    return p


def last_line(p):
    return p.stdout.strip().splitlines()[-1]


def parse_bpb(line):
    m = re.fullmatch(r"bpb: ([0-9.]+) \(loss ([0-9.]+) per token, ([0-9,]+) bytes, ([0-9,]+) tokens\)", line)
    assert m, line
    return float(m[1]), float(m[2]), int(m[3].replace(',', '')), int(m[4].replace(',', ''))


def parse_hellaswag(line):
    m = re.fullmatch(r"hellaswag: acc ([0-9.]+) acc_norm ([0-9.]+) \((\d+) examples.*\)", line)
    assert m, line
    return float(m[1]), float(m[2]), int(m[3])


@pytest.fixture(autouse=True, scope='module')
def one_thread_subprocesses():
    """The scripts run single-threaded too: on a busy 2-core machine a second thread idle-waits (test_model.py)."""
    before = os.environ.get('OMP_NUM_THREADS')
    os.environ['OMP_NUM_THREADS'] = '1'
    yield
    if before is None:
        del os.environ['OMP_NUM_THREADS']
    else:
        os.environ['OMP_NUM_THREADS'] = before


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
    """A tiny random GPT-2 (transformers' own class) saved as a Hugging Face folder: 2 layers, 64 positions."""
    folder = tmp_path_factory.mktemp('hf')
    tiny_hf(folder)
    return folder


@pytest.fixture(scope='module')
def char_model(repo):
    """out-mixed: a character model of MIXED (English, Chinese, emoji), trained for 2 steps by train.py."""
    (repo / 'mixed.txt').write_text(MIXED, encoding='utf-8')
    run(repo, 'prepare.py', 'mixed', '--input=mixed.txt', '--tokenizer=char')
    run(repo, 'train.py', *TINY, '--dataset=mixed', '--max_iters=2', '--eval_interval=2', '--out_dir=out-mixed',
        '--plot=False')
    return 'out-mixed'


# -----------------------------------------------------------------------------
# bytes per token


def test_gpt2_token_bytes_sum_to_the_utf8_length():
    """Over the ids of a mixed Chinese/English/emoji text, GPT-2's byte table sums to its UTF-8 length,
    though some tokens are parts of characters (where decoding each token alone would miscount); and
    end-of-text counts 0 bytes."""
    tok = gpt2_tokenizer()
    text = f"{EN} {ZH} {EMOJI} naïve café — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n"
    ids = tok.encode(text)
    table = tok.token_bytes()
    assert table.shape == (50257,) and table[GPT2_EOT] == 0
    assert table[ids].sum() == len(text.encode('utf-8'))
    assert sum(len(tok.decode([i]).encode('utf-8')) for i in ids) != len(text.encode('utf-8'))  # the naive way fails
    assert table[15496] == 5  # 'Hello'
    assert Tokenizer(dict(type='gpt2')).token_bytes()[GPT2_EOT] == 0  # also where the dataset has no end-of-text


def test_byte_level_bpe_and_char_token_bytes(tmp_path):
    """A byte-level BPE trained by prepare.py (Hugging Face tokenizers) and a character tokenizer: the table
    sums to the UTF-8 length of a text; the BPE's special token counts 0."""
    pytest.importorskip('tokenizers')
    from tokenizer import train_bpe
    train_bpe([MIXED], 300, str(tmp_path / 'tokenizer.json'))
    bpe = Tokenizer(dict(type='tokenizers', file='tokenizer.json'), str(tmp_path))
    chars = Tokenizer(dict(type='char', chars=sorted(set(MIXED))))
    text = EN + ZH + EMOJI + "\n" + ZH[:5]
    for tok in (bpe, chars):
        ids = tok.encode(text)
        assert tok.token_bytes()[ids].sum() == len(text.encode('utf-8'))
    assert len(bpe.encode(text)) < len(text)  # merges happened: tokens of several bytes were counted
    assert bpe.tok.token_to_id('<|endoftext|>') in bpe.special_ids and bpe.token_bytes()[bpe.special_ids.pop()] == 0


def test_score_sums_leave_out_specials_and_ignored_targets():
    """The 4 sums against a computation by hand: a special target counts in the loss per token, not in
    bits per byte; an ignored target (-1) counts nowhere."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 4, 2], [-1, 0, 4]])
    token_bytes = torch.tensor([1, 3, 2, 1, 0])  # id 4 is special
    loss_sum, n, nats, n_bytes = score_sums(logits, targets, token_bytes).tolist()
    nll = {(b, t): -F.log_softmax(logits[b, t], -1)[targets[b, t]].item() for b in range(2) for t in range(3)
           if targets[b, t] >= 0}
    assert n == 5 and n_bytes == 3 + 2 + 1
    assert loss_sum == pytest.approx(sum(nll.values()), rel=1e-6)
    assert nats == pytest.approx(nll[0, 0] + nll[0, 2] + nll[1, 1], rel=1e-6)


# -----------------------------------------------------------------------------
# bits per byte with eval.py


def test_bpb_of_a_char_model_ascii_and_chinese(repo, char_model):
    """Every character of ASCII text is 1 byte: bpb = loss per token / ln 2; of Chinese text, 3 bytes:
    a third of that. Every character is scored (the first after a newline as context)."""
    for text, width in ((EN[:30] + "\n" + EN, 1), (ZH + ZH[::-1], 3)):
        (repo / 'held.txt').write_text(text, encoding='utf-8')
        p = run(repo, 'eval.py', f'--out_dir={char_model}', '--task=bpb', '--input=held.txt', '--batch_size=3', *CPU)
        bpb, loss, n_bytes, n_tokens = parse_bpb(last_line(p))
        assert (n_tokens, n_bytes) == (len(text), width * len(text))
        assert bpb == pytest.approx(loss / LN2 / width, abs=2e-4)
        assert loss > 1.0


def test_char_and_bpe_models_score_the_same_bytes(repo, char_model, hf_folder):
    """The same mixed text, read by a character model and by a GPT-2 BPE model: other token counts, the same
    bytes, its UTF-8 length. The BPE model's windows shared by 2 Gloo processes (torchrun): the numbers of one."""
    text = EN + "\n" + ZH + EMOJI + "\n" + EN[::-1] + ZH
    (repo / 'held.txt').write_text(text, encoding='utf-8')
    char = parse_bpb(last_line(run(repo, 'eval.py', f'--out_dir={char_model}', '--input=held.txt', *CPU)))
    args = ['eval.py', f'--init_from={hf_folder}', '--input=held.txt', '--block_size=16', '--batch_size=2', *CPU]
    one = run(repo, *args)
    bpe = parse_bpb(last_line(one))
    assert char[2] == bpe[2] == len(text.encode('utf-8'))
    assert char[3] == len(text) and bpe[3] == len(gpt2_encoding().encode_ordinary(text))
    assert bpe[3] > 5 * 8 * 2  # windows every 8 tokens: more than 5 batches of 2 to share out
    two = torchrun(repo, *args)
    assert '2 process(es)' in two.stdout, two.stdout
    # the same bytes and tokens; the same losses to the printed 4 decimals, give or take the last one:
    # the two processes add their batches' sums in another order
    both = parse_bpb(last_line(two)), bpe
    assert both[0][2:] == both[1][2:] and max(abs(a - b) for a, b in zip(*both)) <= 1e-4, both


def test_val_task_scores_every_token_once(repo, char_model):
    meta = json.loads((repo / 'data' / 'mixed' / 'meta.json').read_text())
    p = run(repo, 'eval.py', f'--out_dir={char_model}', '--task=val', '--batch_size=4', *CPU)
    bpb, loss, n_bytes, n_tokens = parse_bpb(last_line(p))
    assert n_tokens == meta['val_tokens'] - 1  # every target, the first token being context only
    assert n_tokens < n_bytes < 4 * n_tokens  # a mix of 1, 3 and 4 byte characters


# -----------------------------------------------------------------------------
# HellaSwag


def reference_losses(folder):
    """(summed, mean) loss of each ending of each item, (5, 4) each, by transformers' GPT-2: each ending's
    tokens scored after the context's, one sequence at a time (no padding)."""
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    enc = gpt2_encoding()
    totals, means = torch.zeros(len(ITEMS), 4), torch.zeros(len(ITEMS), 4)
    for i, (ctx, endings, _) in enumerate(ITEMS):
        for j, ending in enumerate(endings):
            c, e = enc.encode(ctx), enc.encode(' ' + ending)
            with torch.no_grad():
                logp = F.log_softmax(hf(torch.tensor([c + e])).logits[0], dim=-1)  # (T, vocab)
            nll = torch.tensor([-logp[len(c) + k - 1, t] for k, t in enumerate(e)])  # position t predicts t + 1
            totals[i, j], means[i, j] = nll.sum(), nll.mean()
    return totals, means


def test_hellaswag_equals_transformers(repo, hf_folder):
    """Each ending's summed and mean loss (scoring.py, in this process), the predictions and both accuracies
    (eval.py, on 1 and 2 processes) equal those computed with transformers' GPT2LMHeadModel on the same random
    GPT-2; acc and acc_norm disagree on these items."""
    totals, means = reference_losses(hf_folder)
    model = from_pretrained(str(hf_folder)).eval()
    for i, (ctx, endings, _) in enumerate(ITEMS):
        x, y = render_hellaswag(ctx, endings, gpt2_tokenizer(), model.config.block_size)
        total, mean = ending_losses(model, x, y, contextlib.nullcontext())
        torch.testing.assert_close(total, totals[i], atol=1e-4, rtol=0)
        torch.testing.assert_close(mean, means[i], atol=1e-4, rtol=0)
    labels = torch.tensor([label for _, _, label in ITEMS])
    pred, pred_norm = totals.argmin(dim=1), means.argmin(dim=1)
    assert (pred != pred_norm).any()  # the two rules pick differently somewhere: a swap would show
    acc, acc_norm = (pred == labels).float().mean().item(), (pred_norm == labels).float().mean().item()
    assert acc != acc_norm
    path = write_hellaswag(repo / 'hs.jsonl')
    args = ['eval.py', f'--init_from={hf_folder}', '--task=hellaswag', f'--input={path}', *CPU]
    for p in (run(repo, *args), torchrun(repo, *args)):  # 1 process, and 2 Gloo processes sharing the 5 items
        assert parse_hellaswag(last_line(p)) == (pytest.approx(acc, abs=1e-4), pytest.approx(acc_norm, abs=1e-4), 5)


def test_train_logs_hellaswag(repo, hf_folder):
    """train.py's eval_hellaswag, at the first evaluation of GPT-2's weights cropped to 16 positions, reads what
    scoring.py computes for that model (on one process, and on two with FSDP, where every process must run as
    many forward passes); log.jsonl has both accuracies."""
    write_hellaswag(repo / 'data' / 'hellaswag' / 'hellaswag_val.jsonl')  # where it looks
    run(repo, 'prepare.py', 'shakespeare')
    model = from_pretrained(str(hf_folder)).eval()
    model.crop_block_size(16)
    right = torch.zeros(2)
    for ctx, endings, label in ITEMS:
        total, mean = ending_losses(model, *render_hellaswag(ctx, endings, gpt2_tokenizer(), 16), contextlib.nullcontext())
        right += torch.tensor([total.argmin() == label, mean.argmin() == label])
    expected = (right / len(ITEMS)).tolist()
    args = ['train.py', *TINY, '--dataset=shakespeare', f'--init_from={hf_folder}', '--eval_only=True',
            '--eval_hellaswag=5', '--gradient_accumulation_steps=2', '--plot=False']
    for p in (run(repo, *args, '--out_dir=out-hs'), torchrun(repo, *args, '--fsdp=True', '--out_dir=out-hs2')):
        assert float(re.search(r"hellaswag acc_norm ([0-9.]+)", p.stdout)[1]) == pytest.approx(expected[1], abs=1e-4)
    record = json.loads((repo / 'out-hs' / 'log.jsonl').read_text().splitlines()[0])
    assert [record['hellaswag_acc'], record['hellaswag_acc_norm']] == pytest.approx(expected, abs=1e-6)


# -----------------------------------------------------------------------------
# train.py's bits per byte


def test_train_logs_and_plots_bpb(repo, char_model):
    """Shakespeare's characters are all ASCII: the val bpb train.py prints and logs is val loss / ln 2; the
    plot gains a panel for it. MIXED's characters are 1.7 bytes on average (1, 3 and 4): bpb is lower."""
    p = run(repo, 'train.py', *TINY, '--max_iters=2', '--eval_interval=2', '--out_dir=out-bpb', '--plot=True')
    printed = [float(v) for v in re.findall(r"val bpb ([0-9.]+)", p.stdout)]
    records = [r for r in map(json.loads, (repo / 'out-bpb' / 'log.jsonl').read_text().splitlines()) if 'val_loss' in r]
    assert len(printed) == len(records) == 2
    for r, bpb in zip(records, printed):
        assert r['val_bpb'] == pytest.approx(r['val_loss'] / LN2, rel=1e-5) and bpb == pytest.approx(r['val_bpb'], abs=1e-4)
        assert r['train_bpb'] == pytest.approx(r['train_loss'] / LN2, rel=1e-5)
    for r in [r for r in map(json.loads, (repo / char_model / 'log.jsonl').read_text().splitlines()) if 'val_loss' in r]:
        assert 0.4 < r['val_bpb'] / (r['val_loss'] / LN2) < 0.8 and 0.4 < r['train_bpb'] / (r['train_loss'] / LN2) < 0.8
    width, height = struct.unpack('>II', (repo / 'out-bpb' / 'loss.png').read_bytes()[16:24])
    assert width > 1.6 * height  # two panels side by side


# -----------------------------------------------------------------------------
# bad input: one line each


def test_malformed_hellaswag_files(tmp_path):
    """Each problem named with its file:line (in this process: the scripts print the DataError in one line)."""
    good = hellaswag_item(0, *ITEMS[0])
    for lines, where, what in [([good, '{"ctx": "no endings"'], ':2:', 'not a HellaSwag item'),
                               ([good, good.replace('"endings"', '"ends"')], ':2:', "no 'endings'"),
                               ([hellaswag_item(0, "ctx", ["a", "b", "c"], 0)], ':1:', "'endings' (4 texts)"),
                               ([hellaswag_item(0, "ctx", ["a", "b", "c", "d"], 4)], ':1:', "'label' (0-3)")]:
        path = tmp_path / 'h.jsonl'
        path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
        with pytest.raises(DataError, match=f"h.jsonl{where}.*{re.escape(what)}"):
            read_hellaswag(str(path))
    (tmp_path / 'h.jsonl').write_text('\n\n', encoding='utf-8')
    with pytest.raises(DataError, match='holds no HellaSwag items'):
        read_hellaswag(str(tmp_path / 'h.jsonl'))
    with pytest.raises(DataError, match="'nowhere.jsonl' not found"):
        hellaswag_file('nowhere.jsonl')


def test_bad_input(repo, char_model, hf_folder):
    (repo / 'empty.txt').write_text('', encoding='utf-8')
    (repo / 'bad.jsonl').write_text(hellaswag_item(0, *ITEMS[0]) + '\n{"ctx": "no endings"\n', encoding='utf-8')
    (repo / 'zh.txt').write_text(EN + "天地 ΩΩ", encoding='utf-8')  # 天地 are known
    model = f'--out_dir={char_model}'
    cases = [
        ([model, '--task=hello'], ["task must be 'bpb', 'hellaswag' or 'val'", "'hello'"]),
        ([model, '--input=empty.txt'], ['holds no text']),
        ([model, '--input=zh.txt'], ["has 2 characters (1 distinct: 'Ω')", "never saw"]),
        ([f'--init_from={hf_folder}', '--task=hellaswag', '--input=bad.jsonl'], ['bad.jsonl:2:', 'not a HellaSwag item']),
    ]
    for args, fragments in cases:
        assert_one_line_error(run(repo, 'eval.py', *args, *CPU, ok=False), *fragments)
    p = run(repo, 'train.py', *TINY, '--eval_hellaswag=10', '--out_dir=out-hsc', ok=False)
    assert_one_line_error(p, "eval_hellaswag needs data in GPT-2's BPE", "'char'")
