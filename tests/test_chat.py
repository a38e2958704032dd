"""
Chat finetuning end to end, on conversations the tests write: the template (special ids after the base's,
marker text typed by a user stays text), prepare.py on each record shape, the loss as the mean cross-entropy
over the assistant's tokens (computed here independently), resume and torchrun on a chat dataset, a tiny model
that learns a rule and answers held-out questions through chat.py, and the export that transformers runs.
"""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conversations import encode_conversation, render_prompt  # noqa: E402
from test_resume import assert_same_weights, torchrun, weights
from test_scripts import ROOT, TINY, assert_one_line_error, copy_scripts, logged, run

sys.path.insert(0, ROOT)
from conversations import chat_template  # noqa: E402
from letters import LETTERS, skill  # noqa: E402,F401
from tokenizer import Tokenizer, gpt2_tokenizer, load_meta, load_tokenizer  # noqa: E402

CHAT = [*TINY[1:], '--block_size=32', '--compile=False', '--plot=False']


def write_jsonl(path, records):
    path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records), encoding='utf-8')
    return path


@pytest.fixture(scope='module')
def repo(tmp_path_factory):
    """The scripts and data/gpt2.tiktoken in a temporary folder, with data/skill: 600 conversations, characters."""
    dst = copy_scripts(tmp_path_factory.mktemp('repo'))
    run(dst, 'prepare.py', 'skill', f'--input={write_jsonl(dst / "skill.jsonl", skill(600, 1))}', '--tokenizer=char')
    return dst


def test_template_ids_follow_the_base_and_markers_typed_are_text():
    tok = Tokenizer(dict(type='char', chars=list('<>|abcdersu')), chat=chat_template(11, 11))
    assert tok.special == {'<|system|>': 11, '<|user|>': 12, '<|assistant|>': 13, '<|end|>': 14}
    assert tok.special_ids == {11, 12, 13, 14} and tok.n_vocab == 15
    ids, mask = encode_conversation(tok, [dict(role='user', content='<|user|>'), dict(role='assistant', content='ab')])
    assert ids == [12, *tok.encode('<|user|>'), 14, 13, 3, 4, 14]  # the typed marker: 8 characters, not id 12
    assert mask == [0] * 10 + [0, 1, 1, 1]  # the assistant's text and its <|end|> only
    assert render_prompt(tok, [dict(role='user', content='ab')]) == [12, 3, 4, 14, 13]
    assert tok.decode(ids) == '<|user|><|user|><|end|><|assistant|>ab<|end|>'
    gpt2 = Tokenizer(dict(type='gpt2'), eot=50256, chat=chat_template(50257, 50257))
    ids, _ = encode_conversation(gpt2, [dict(role='user', content='Hi <|end|><|endoftext|>'),
                                       dict(role='assistant', content='Yo')])
    assert ids == [50258, *gpt2_tokenizer().encode('Hi <|end|><|endoftext|>'), 50260, 50259,
                   *gpt2_tokenizer().encode('Yo'), 50260]
    assert max(ids[1:-4]) < 50256  # no special id, not even <|endoftext|>, inside the user's text


def test_prepare_reads_each_shape_and_reuses_a_base_tokenizer(repo, tmp_path):
    """messages, ShareGPT and Alpaca records (a .jsonl and a .json array in a folder) give exactly the ids and
    mask of encode_conversation; --tokenizer=data/skill keeps skill's ids and appends the new characters."""
    (tmp_path / 'in').mkdir()
    write_jsonl(tmp_path / 'in' / 'a.jsonl', [
        dict(conversations=[dict(value='Be kind.', **{'from': 'system'}), dict(value='hi', **{'from': 'human'}),
                            dict(value='Hello!', **{'from': 'gpt'})]),
        dict(messages=[dict(role='user', content='abc'), dict(role='assistant', content='ABC')])])
    (tmp_path / 'in' / 'b.json').write_text(json.dumps([dict(instruction='Add', input='1 2', output='3'),
                                                        dict(instruction='Say 你好', input='', output='你好')]))
    (tmp_path / 'base.txt').write_text('abc ABC hi\n' * 200, encoding='utf-8')  # a base model's text: no '!'
    run(repo, 'prepare.py', 'base_chars', f'--input={tmp_path / "base.txt"}', '--tokenizer=char')
    run(repo, 'prepare.py', 'shapes', f'--input={tmp_path / "in"}', '--tokenizer=data/base_chars', '--val_fraction=0.5')
    data = repo / 'data' / 'shapes'
    meta, base = load_meta(data), load_meta(repo / 'data' / 'base_chars')
    chars, n = meta['tokenizer']['chars'], base['vocab_size']
    assert chars[:n] == base['tokenizer']['chars'] and '!' in chars[n:]  # the base's ids keep their meaning
    assert meta['chat']['base_vocab_size'] == n and min(meta['chat']['tokens'].values()) == len(chars)
    # a chat dataset's tokenizer is reused as it is (template included), and cannot grow: one line if it must
    run(repo, 'prepare.py', 'again', f'--input={write_jsonl(tmp_path / "s.jsonl", skill(20, 5))}', '--tokenizer=data/skill')
    assert load_meta(repo / 'data' / 'again')['chat'] == load_meta(repo / 'data' / 'skill')['chat']
    p = run(repo, 'prepare.py', 'grown', f'--input={tmp_path / "in"}', '--tokenizer=data/skill', ok=False)
    assert_one_line_error(p, "data/skill's vocabulary lacks", 'cannot grow')
    expected = [[dict(role='system', content='Be kind.'), dict(role='user', content='hi'),
                 dict(role='assistant', content='Hello!')],
                [dict(role='user', content='Add\n\n1 2'), dict(role='assistant', content='3')]]  # train: 1st, 3rd
    tok = load_tokenizer(meta, data)
    pairs = [encode_conversation(tok, m) for m in expected]
    assert np.fromfile(data / 'train.bin', dtype=np.uint16).tolist() == pairs[0][0] + pairs[1][0]
    assert np.fromfile(data / 'train_mask.bin', dtype=np.uint8).tolist() == pairs[0][1] + pairs[1][1]
    assert np.fromfile(data / 'train_starts.bin', dtype=np.uint64).tolist() == [0, len(pairs[0][0])]
    assert (meta['train_conversations'], meta['val_conversations']) == (2, 2)


@pytest.mark.parametrize('lines, fragments', [
    (['{"messages": []}', 'not json'], ['bad.jsonl:2 is not JSON']),
    (['{"prompt": "a", "completion": "b"}'], ['bad.jsonl:1', 'no known shape', 'completion, prompt']),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}'],
     ['bad.jsonl:1', 'alternating']),
    (['{"conversations": [{"from": "human", "value": "a"}]}'], ['bad.jsonl:1', 'at least one assistant']),
    (['{"instruction": "a", "input": "", "output": " "}'], ['bad.jsonl:1', 'message 2 (assistant) has empty content']),
])
def test_bad_conversations(repo, tmp_path, lines, fragments):
    path = tmp_path / 'bad.jsonl'
    path.write_text('\n'.join(lines) + '\n')
    p = run(repo, 'prepare.py', 'bad', f'--input={path}', '--tokenizer=char', ok=False)
    assert_one_line_error(p, *fragments)
    assert not (repo / 'data' / 'bad').exists()  # nothing half-written


def test_bad_starting_points(repo, tmp_path):
    p = run(repo, 'prepare.py', 'x', f'--input={repo / "skill.jsonl"}', '--tokenizer=data/nothing', ok=False)
    assert_one_line_error(p, '--tokenizer=data/nothing', "'nothing' is not prepared")
    # a model of another vocabulary: 'skill' builds on characters, this one learned GPT-2's 50,257 ids
    (tmp_path / 't.txt').write_text('some plain text to pretrain on. ' * 200)
    run(repo, 'prepare.py', 'plain', f'--input={tmp_path / "t.txt"}', '--tokenizer=char')
    run(repo, 'train.py', *CHAT, '--dataset=plain', '--max_iters=1', '--eval_interval=1', '--out_dir=out-plain')
    p = run(repo, 'train.py', *CHAT, '--dataset=skill', '--init_from=out-plain/ckpt.pt', '--out_dir=out-no', ok=False)
    assert_one_line_error(p, 'cannot be grown', '--tokenizer=data/')
    p = run(repo, 'chat.py', '--out_dir=out-plain', '--device=cpu', ok=False)
    assert_one_line_error(p, 'without a chat template', '--tokenizer=data/plain')


def masked_mean_loss(repo, out_dir, dataset, streams, block_size=32, batch_size=4):
    """The mean cross-entropy over every assistant token of the batches of streams, computed here: rows of
    block_size + 1 tokens from conversation starts (docs/design.md, Determinism), the model of out_dir/ckpt.pt."""
    from checkpoint import load_checkpoint
    from batches import draw
    data = repo / 'data' / dataset
    ids, mask = np.fromfile(data / 'train.bin', dtype=np.uint16), np.fromfile(data / 'train_mask.bin', dtype=np.uint8)
    starts = np.fromfile(data / 'train_starts.bin', dtype=np.uint64).astype(np.int64)
    model, _ = load_checkpoint(str(repo / out_dir / 'ckpt.pt'), 'cpu')
    nll, count = 0.0, 0
    for stream in streams:
        for s in starts[draw(stream, batch_size, len(starts))]:
            row = np.zeros(block_size + 1, dtype=np.int64)
            keep = np.zeros(block_size + 1, dtype=bool)
            n = min(block_size + 1, len(ids) - s)
            row[:n], keep[:n] = ids[s:s + n], mask[s:s + n]
            with torch.no_grad():
                logits, _ = model(torch.from_numpy(row[None, :-1]), torch.zeros(1, block_size, dtype=torch.long))
            logp = F.log_softmax(logits[0].double(), dim=-1)  # (T, vocab)
            targets = np.flatnonzero(keep[1:])
            nll -= logp[targets, row[1:][targets]].sum().item()
            count += len(targets)
    return nll / count


def test_loss_is_the_mean_over_assistant_tokens(repo):
    """train.py's loss of a step (log.jsonl, full precision) with learning_rate 0 is the mean over all the
    assistant tokens of its 4 micro-batches, not a mean of their means; a micro-batch with none adds 0."""
    run(repo, 'train.py', *CHAT, '--dataset=skill', '--max_iters=30', '--eval_interval=30', '--out_dir=out-base',
        '--learning_rate=1e-2')  # a model whose losses differ from token to token
    run(repo, 'train.py', *CHAT, '--dataset=skill', '--init_from=out-base/ckpt.pt', '--max_iters=1', '--eval_interval=1',
        '--learning_rate=0', '--gradient_accumulation_steps=4', '--out_dir=out-lr0', '--seed=7', '--plot=False')
    loss = next(json.loads(line)['loss'] for line in (repo / 'out-lr0' / 'log.jsonl').read_text().splitlines()
                if 'loss' in json.loads(line))
    assert loss == pytest.approx(masked_mean_loss(repo, 'out-base', 'skill', [(7, 0, 0, m) for m in range(4)]), abs=1e-5)


def test_no_gradient_reaches_a_user_token_logit(repo):
    """The targets train.py builds from the mask (-1 outside it): the loss's gradient is exactly 0 at each
    logit row whose target is a user or system token or a turn's opening marker, and non-zero at the others."""
    from model import GPT, GPTConfig
    data = repo / 'data' / 'skill'
    ids = torch.from_numpy(np.fromfile(data / 'train.bin', dtype=np.uint16)[:33].astype(np.int64))
    mask = torch.from_numpy(np.fromfile(data / 'train_mask.bin', dtype=np.uint8)[:33].astype(bool))
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=load_meta(data)['vocab_size']))
    out = {}
    def keep(module, inputs, logits):  # the logits (1, T, vocab), kept with their gradient
        logits.retain_grad()
        out['logits'] = logits
    model.lm_head.register_forward_hook(keep)
    _, loss = model(ids[None, :-1], torch.where(mask[1:], ids[1:], -1)[None], reduction='sum')
    loss.backward()
    grad_rows = out['logits'].grad[0].abs().sum(dim=-1)  # (T,)
    assert (grad_rows[~mask[1:]] == 0).all() and (grad_rows[mask[1:]] > 0).all()
    # and the mask marks what the assistant says, found here from the markers: after <|assistant|>, to <|end|>
    special, role, expected = load_meta(data)['chat']['tokens'], None, []
    for i in ids.tolist():
        expected.append(role == 'assistant')
        role = {special['<|end|>']: None, special['<|user|>']: 'user', special['<|system|>']: 'system',
                special['<|assistant|>']: 'assistant'}.get(i, role)
    assert mask.tolist() == expected and 0 < mask[1:].sum() < 32


def test_resume_and_two_processes_on_chat_data(repo):
    """Chat batches are a pure function of (seed, iter_num, micro-step): a resumed run is bit-identical,
    2 Gloo processes equal 1 within 1e-6 (the target count is summed across them first)."""
    args = [*CHAT, '--dataset=skill', '--gradient_accumulation_steps=4', '--max_iters=8', '--eval_interval=4',
            '--learning_rate=1e-3', '--warmup_iters=2', '--lr_decay_iters=8']
    one = run(repo, 'train.py', *args, '--out_dir=out-c1')
    run(repo, 'train.py', *args, '--max_iters=4', '--out_dir=out-cr')
    run(repo, 'train.py', *args, '--out_dir=out-cr', '--init_from=resume')
    assert_same_weights(weights(repo, 'out-c1'), weights(repo, 'out-cr'))
    two = torchrun(repo, *args, '--out_dir=out-c2')
    a, b = weights(repo, 'out-c1'), weights(repo, 'out-c2')
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    for it, loss in logged(one.stdout, 'loss').items():
        assert logged(two.stdout, 'loss')[it] == pytest.approx(loss, abs=1e-5)


def test_a_finetuned_model_answers_held_out_questions(repo):
    """A tiny model learns the skill from 2,000 conversations; through chat.py with piped input it answers
    100 held-out words (>= 90 % exact: a reply that runs past <|end|> is wrong) and 'again' from the turn before."""
    run(repo, 'prepare.py', 'skill2k', f'--input={write_jsonl(repo / "skill2k.jsonl", skill(2000, 2))}',
        '--tokenizer=char')
    # 2 x 64 wide, with Muon: 100 steps of 16 conversations give 100 of 100 held-out words and 100 'again's
    # (AdamW needed 500 steps of 32: its loss sat at the letters' entropy, ~1.73, until ~step 150)
    one_thread = dict(os.environ, OMP_NUM_THREADS='1')
    train = subprocess.run([sys.executable, 'train.py', *TINY[1:], '--dataset=skill2k', '--n_layer=2', '--n_embd=64',
                            '--block_size=64', '--batch_size=16', '--max_iters=120', '--eval_interval=120',
                            '--eval_iters=1', '--optimizer=muon', '--muon_learning_rate=0.05', '--learning_rate=1e-2',
                            '--min_lr=1e-3', '--warmup_iters=10', '--lr_decay_iters=120', '--log_interval=20',
                            '--out_dir=out-skill', '--compile=False', '--plot=False'],
                           cwd=repo, env=one_thread, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    words = [m['messages'][0]['content'] for m in skill(100, 3, held_out=True)]
    lines = '\n'.join(f"{w}\nagain\n/clear" for w in words) + '\n'  # each: a question, then one about it
    p = subprocess.run([sys.executable, 'chat.py', '--out_dir=out-skill', '--device=cpu', '--temperature=0',
                        '--max_new_tokens=8'], cwd=repo, env=one_thread, input=lines, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    replies = p.stdout.splitlines()
    assert len(replies) == 2 * len(words)  # one line per turn; /clear gives none
    right = [replies[2 * i] == w.upper() for i, w in enumerate(words)]
    again = [replies[2 * i + 1] == w.upper() for i, w in enumerate(words)]
    assert sum(right) >= 90 and sum(again) >= 90, (sum(right), sum(again), replies[:10])
    # the cache kept across turns is exact: the same replies recomputing everything; a conversation longer
    # than the context (64 tokens, ~10 a turn) drops its oldest turns, says so once, and still answers
    long = ''.join(f"{w}\nagain\n" for w in words[:12])
    kept, plain = (subprocess.run([sys.executable, 'chat.py', '--out_dir=out-skill', '--device=cpu', '--temperature=0',
                                   '--max_new_tokens=8', f'--kv_cache={c}'], cwd=repo, env=one_thread, input=long,
                                  capture_output=True, text=True, timeout=300) for c in (True, False))
    assert kept.stdout == plain.stdout and kept.stderr.count('oldest turns are dropped') == 1
    # still answering: 16 of 24 measured; the model learned conversations of 1-3 turns, this one has 12 (the
    # window then holds ~6), so some replies drift; a broken drop (a cut mid-turn) gets next to none right
    assert sum(r == w.upper() for r, w in zip(kept.stdout.splitlines(), [w for w in words[:12] for _ in 'ab'])) >= 12


def test_export_of_a_chat_model_from_gpt2_weights_replies_as_chat_py(repo, tmp_path, monkeypatch):
    """SFT from a tiny transformers GPT-2 (a folder): the embedding grows by the 4 markers (to 50,304 rows, padded);
    the export's chat template gives the ids chat.py feeds, and transformers' greedy generate its reply, token for
    token (compared with our model's greedy tokens, and as text with chat.py's own output)."""
    import subprocess
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / 'tiny-gpt2')
    run(repo, 'prepare.py', 'skill_gpt2', f'--input={write_jsonl(tmp_path / "s.jsonl", skill(200, 4))}',
        '--tokenizer=gpt2')
    p = run(repo, 'train.py', *CHAT, '--dataset=skill_gpt2', f'--init_from={tmp_path / "tiny-gpt2"}',
            '--max_iters=20', '--eval_interval=20', '--learning_rate=1e-2', '--out_dir=out-gpt2-sft')
    assert 'grow by 47 rows to 50,304; ids 50,257..50,260' in p.stdout
    chat = subprocess.run([sys.executable, 'chat.py', '--out_dir=out-gpt2-sft', '--device=cpu', '--temperature=0',
                           '--max_new_tokens=12'], cwd=repo, input='abc\n', capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
    run(repo, 'export_hf.py', '--out_dir=out-gpt2-sft', f'--hf_dir={tmp_path / "hf"}')

    import checkpoint
    monkeypatch.setattr(checkpoint, 'DATA_DIR', str(repo / 'data'))
    model, tok, _ = checkpoint.load_model(str(repo / 'out-gpt2-sft'), 'cpu')
    messages = [dict(role='user', content='abc')]
    ours = model.generate(torch.tensor([render_prompt(tok, messages)]), 12, temperature=0, vocab_size=tok.n_vocab)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / 'hf')
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / 'hf')
    prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(prompt) == render_prompt(tok, messages)
    theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    reply = []
    for i in ours[0, len(prompt):].tolist():
        if i in tok.special_ids:
            break
        reply.append(i)
    assert theirs[:len(reply)] == reply and (len(reply) == 12 or theirs[len(reply)] in tok.special_ids)
    assert chat.stdout == tok.decode(reply) + '\n'
    assert hf_tok.decode(theirs, skip_special_tokens=True) == tok.decode(reply)


def test_alpaca_from_the_hub(tmp_path, monkeypatch):
    """The named 'alpaca' through the hub path (its parquet files, stood in for by a local folder in the same
    layout, as test_prepare.py's openwebtext): Alpaca records in, the template's ids out; an empty output skipped."""
    pq = pytest.importorskip('pyarrow.parquet', reason='pip install -r requirements-test.txt (datasets)')
    pytest.importorskip('datasets', reason='pip install -r requirements-test.txt')
    import pyarrow as pa

    import prepare
    rows = dict(instruction=[f'Count to {i}.' for i in range(50)], input=['' if i % 2 else '快' for i in range(50)],
                output=['' if i == 7 else ' '.join(map(str, range(i + 1))) for i in range(50)])
    (tmp_path / 'hub' / 'default').mkdir(parents=True)
    pq.write_table(pa.table(rows), tmp_path / 'hub' / 'default' / 'train-00000-of-00001.parquet')
    monkeypatch.setattr(prepare, 'DATA_DIR', str(tmp_path / 'data'))
    monkeypatch.setitem(prepare.DATASETS['alpaca'], 'hub', str(tmp_path / 'hub'))
    meta = prepare.prepare('alpaca', workers=1)
    assert (meta['train_conversations'], meta['val_conversations']) == (48, 1)  # 49 of 50: the 49th validates
    tok = load_tokenizer(meta, tmp_path / 'data' / 'alpaca')
    first = encode_conversation(tok, [dict(role='user', content='Count to 0.\n\n快'), dict(role='assistant', content='0')])
    train = np.fromfile(tmp_path / 'data' / 'alpaca' / 'train.bin', dtype=np.uint16).tolist()
    assert train[:len(first[0])] == first[0] and meta['chat']['tokens']['<|user|>'] == 50258
