"""
LoRA and DPO through the real scripts (train.py, chat.py, export_hf.py as subprocesses), on the
letters skills of tests/letters.py with a tiny base model trained first; and DPO's numbers against
the paper's formula computed here in float64. (lora.py's layers against peft: tests/test_lora.py.)
"""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import letters
from test_resume import TORCHRUN, assert_same_weights, weights
from test_scripts import ROOT, assert_one_line_error, copy_scripts, logged, run

# a base of Qwen3's layout (the quickstart's switches), 2 x 64, trained for 150 steps
SMALL = ['--n_layer=2', '--n_head=4', '--n_embd=64', '--block_size=32', '--batch_size=16',
         '--gradient_accumulation_steps=1', '--rope=True', '--rmsnorm=True', '--swiglu=True',
         '--qk_norm=True', '--bias=False', '--device=cpu', '--dtype=float32', '--plot=False',
         '--eval_iters=5', '--log_interval=10', '--beta2=0.99', '--eval_sample=']
TUNE = ['--block_size=32', '--batch_size=16', '--gradient_accumulation_steps=1', '--device=cpu',
        '--dtype=float32', '--plot=False', '--eval_iters=5', '--log_interval=1', '--beta2=0.99',
        '--warmup_iters=10', '--init_from=out-base/ckpt.pt']
LORA = ['--lora_rank=8', '--lora_alpha=16', '--learning_rate=1e-2', '--min_lr=1e-3']
DPO = ['--dataset=letters_prefs', '--init_from=out-styles/ckpt.pt', '--dpo_beta=0.1',
       '--learning_rate=3e-5', '--decay_lr=False']


@pytest.fixture(scope='module')
def repo(tmp_path_factory):
    """The scripts, Shakespeare and the committed letters files, prepared; out-base: the base."""
    dst = copy_scripts(tmp_path_factory.mktemp('repo'))
    for name in ('shakespeare_char', 'letters_chat', 'letters_styles', 'letters_prefs'):
        shutil.copytree(os.path.join(ROOT, 'data', name), dst / 'data' / name,
                        ignore=shutil.ignore_patterns('*.bin', 'meta.json', '*.tmp'))
        run(dst, 'prepare.py', name)
    run(dst, 'train.py', '--dataset=shakespeare_char', *SMALL, '--optimizer=muon', '--max_iters=150',
        '--lr_decay_iters=150', '--eval_interval=150', '--learning_rate=8e-3', '--min_lr=8e-4',
        '--muon_learning_rate=0.05', '--warmup_iters=10', '--out_dir=out-base')
    return dst


def replies(repo, out_dir):
    """chat.py's greedy replies to the 100 held-out words, one conversation line by line."""
    words = letters.words(held_out=True)
    p = subprocess.run([sys.executable, 'chat.py', f'--out_dir={out_dir}', '--temperature=0',
                        '--device=cpu', '--dtype=float32'], cwd=repo, input='\n'.join(words) + '\n',
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return dict(zip(words, p.stdout.split('\n')))


def test_committed_letters_files_are_the_generators_output():
    for folder, name, records in (('letters_chat', 'conversations.jsonl', letters.skill(2000, 2)),
                                  ('letters_styles', 'conversations.jsonl', letters.styles(2000, 3)),
                                  ('letters_prefs', 'pairs.jsonl', letters.preferences(2000, 4))):
        with open(os.path.join(ROOT, 'data', folder, name), encoding='utf-8') as f:
            assert f.read() == letters.jsonl(records), folder


# -----------------------------------------------------------------------------
# LoRA


@pytest.fixture(scope='module')
def lora_run(repo):
    """LoRA (rank 8) on the letters skill from the base: 200 steps in out-lora."""
    run(repo, 'train.py', '--dataset=letters_chat', *TUNE, *LORA, '--max_iters=200',
        '--lr_decay_iters=200', '--eval_interval=100', '--out_dir=out-lora')
    return repo / 'out-lora'


def test_lora_learns_the_skill_and_keeps_only_its_adapters(repo, lora_run):
    """>= 95 of the 100 held-out words answered exactly through chat.py; the checkpoint holds the
    adapters and the new tokens' rows (and their Adam moments) and names its base: a small file."""
    got = replies(repo, 'out-lora')
    assert sum(got[w] == w.upper() for w in got) >= 95, got
    ckpt = torch.load(lora_run / 'ckpt.pt', weights_only=True)
    assert ckpt['lora']['base'] == str(repo / 'out-base' / 'ckpt.pt') and ckpt['lora']['rank'] == 8
    assert all(k.endswith(('lora_A', 'lora_B', 'rows')) for k in ckpt['model'])
    # rank 8 on a 64-wide model: adapters of 16 % of its weights, a file of about a quarter
    assert os.path.getsize(lora_run / 'ckpt.pt') < 0.3 * os.path.getsize(repo / 'out-base' / 'ckpt.pt')


def test_lora_resumes_bit_identically(repo):
    args = ['--dataset=letters_chat', *TUNE, *LORA, '--lr_decay_iters=12', '--eval_interval=6']
    straight = run(repo, 'train.py', *args, '--max_iters=12', '--out_dir=out-lora-12')
    run(repo, 'train.py', *args, '--max_iters=6', '--out_dir=out-lora-6')
    resumed = run(repo, 'train.py', *args, '--max_iters=12', '--init_from=resume', '--out_dir=out-lora-6')
    assert logged(resumed.stdout, 'loss') == {k: v for k, v in logged(straight.stdout, 'loss').items() if k >= 6}
    assert_same_weights(weights(repo, 'out-lora-12'), weights(repo, 'out-lora-6'))


def test_lora_export_is_the_unmerged_model(repo, lora_run, tmp_path):
    """export_hf.py folds the adapters into the weights: transformers' logits are those of our model
    with its adapters on the side (load_checkpoint keeps them), within 1e-5."""
    transformers = pytest.importorskip('transformers')
    from checkpoint import load_checkpoint
    run(repo, 'export_hf.py', '--out_dir=out-lora', f'--hf_dir={tmp_path / "hf"}')
    ours, _ = load_checkpoint(str(lora_run / 'ckpt.pt'), 'cpu')
    assert any(type(m).__name__ == 'LoRALinear' for m in ours.modules())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').eval()
    idx = torch.randint(0, 69, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours.eval()(idx, idx)[0], atol=1e-5, rtol=0)


def test_lora_under_ddp_equals_one_process(repo):
    args = ['train.py', '--dataset=letters_chat', *TUNE, *LORA, '--gradient_accumulation_steps=2',
            '--max_iters=4', '--eval_interval=4', '--lr_decay_iters=4']
    run(repo, 'train.py', *args[1:], '--out_dir=out-lora-one')
    p = subprocess.run([*TORCHRUN, *args, '--out_dir=out-lora-ddp'], cwd=repo, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    one, two = weights(repo, 'out-lora-one'), weights(repo, 'out-lora-ddp')
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6)


def test_lora_refuses_what_it_cannot_do(repo):
    p = run(repo, 'train.py', '--dataset=letters_chat', *SMALL, '--lora_rank=8', '--out_dir=out-no', ok=False)
    assert_one_line_error(p, 'lora_rank=8 adapts a trained model', "init_from='scratch'")
    env = dict(os.environ, RANK='0', LOCAL_RANK='0', WORLD_SIZE='2')  # as torchrun sets them
    p = subprocess.run([sys.executable, 'train.py', '--dataset=letters_chat', *TUNE, *LORA, '--fsdp=True',
                        '--gradient_accumulation_steps=2', '--out_dir=out-no'], cwd=repo,
                       capture_output=True, text=True, timeout=300, env=env)
    assert_one_line_error(p, 'fsdp=True')


def test_lora_checkpoint_refuses_a_changed_base(repo):
    """A LoRA checkpoint holds its base's path and fingerprint: a base changed since it was trained
    (retrained, another file at its path) is refused in one line, not adapted silently."""
    shutil.copytree(repo / 'out-base', repo / 'out-base-copy')
    run(repo, 'train.py', '--dataset=letters_chat', *TUNE[:-1], '--init_from=out-base-copy/ckpt.pt', *LORA,
        '--max_iters=2', '--eval_interval=2', '--lr_decay_iters=2', '--out_dir=out-lora-changed')
    run(repo, 'sample.py', '--out_dir=out-lora-changed', '--max_new_tokens=2', '--device=cpu')  # as trained
    base = torch.load(repo / 'out-base-copy' / 'ckpt.pt', weights_only=True)
    base['model']['transformer.ln_f.weight'] += 0.01
    torch.save(base, repo / 'out-base-copy' / 'ckpt.pt')
    p = run(repo, 'sample.py', '--out_dir=out-lora-changed', '--max_new_tokens=2', '--device=cpu', ok=False)
    assert_one_line_error(p, 'out-base-copy/ckpt.pt, has changed since they were trained')


# -----------------------------------------------------------------------------
# DPO


def test_dpo_is_the_papers_formula(repo, styles_run):
    """Preferences.sums on a batch of pairs (batches.py), against -log sigmoid(beta * ((log pi_c -
    log ref_c) - (log pi_r - log ref_r))) computed here in float64 from the two models' logits."""
    from batches import Batches
    from checkpoint import load_checkpoint
    from dpo import Preferences
    from tokenizer import load_meta
    meta = load_meta(str(repo / 'data' / 'letters_prefs'))
    batches = Batches(str(repo / 'data' / 'letters_prefs'), meta)
    policy, _ = load_checkpoint(str(styles_run / 'ckpt.pt'), 'cpu')
    reference, _ = load_checkpoint(str(styles_run / 'ckpt.pt'), 'cpu')
    with torch.no_grad():
        for p in policy.parameters():  # a policy away from the reference
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    prefs, beta, stream = Preferences(batches, 0.3, 4, 32), 0.3, (7, 0, 3, 0)
    prefs.compute(reference.eval(), torch.autocast('cpu', enabled=False), 'cpu')
    x, y = batches.get('train', stream, 4, 32)  # (8, 32): 4 chosen rows, then their 4 rejected
    with torch.no_grad():
        _, nll = policy.eval()(x, y, reduction='none')
        got = prefs.sums(nll, 'train', stream).tolist()
        logp = lambda m: (F.log_softmax(m(x, y)[0].double(), -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
                          * (y >= 0)).sum(1)  # noqa: E731
        pi, ref = logp(policy), logp(reference)
    margins = beta * ((pi[:4] - ref[:4]) - (pi[4:] - ref[4:]))
    want = [-F.logsigmoid(margins).sum().item(), 4, margins.sum().item(), (margins > 0).sum().item()]
    assert got == pytest.approx(want, abs=1e-5) and margins.abs().min() > 1e-3


@pytest.fixture(scope='module')
def styles_run(repo):
    """Full finetuning on letters_styles (replies end with '!' or '.', half and half): out-styles."""
    run(repo, 'train.py', '--dataset=letters_styles', *TUNE, '--learning_rate=3e-3', '--min_lr=3e-4',
        '--max_iters=200', '--lr_decay_iters=200', '--eval_interval=200', '--out_dir=out-styles')
    return repo / 'out-styles'


def test_dpo_starts_at_ln2_and_resumes_bit_identically(repo, styles_run):
    """At step 0 the policy is the reference: every margin 0, the loss ln 2 exactly; a resumed run
    (its reference's log-probabilities in the checkpoint) ends with the uninterrupted one's weights."""
    args = [*TUNE[:-1], *DPO, '--eval_interval=3', '--gradient_accumulation_steps=2']
    straight = run(repo, 'train.py', *args, '--max_iters=6', '--out_dir=out-dpo-6')
    assert 'train margin 0.0000, train accuracy 0.0000, val margin 0.0000' in straight.stdout
    first = json.loads((repo / 'out-dpo-6' / 'log.jsonl').read_text().splitlines()[1])
    assert first['iter'] == 0 and first['loss'] == pytest.approx(math.log(2), abs=1e-7)
    run(repo, 'train.py', *args, '--max_iters=3', '--out_dir=out-dpo-3')
    run(repo, 'train.py', *args, '--max_iters=6', '--init_from=resume', '--out_dir=out-dpo-3')
    assert_same_weights(weights(repo, 'out-dpo-6'), weights(repo, 'out-dpo-3'))


def test_dpo_learns_a_preference_the_sft_model_lacks(repo, styles_run):
    """The finetuned model ends replies with '!' or '.' by the word; after 40 DPO steps on pairs
    preferring '!', >= 90 of the 100 held-out words get '!', and >= 95 keep their letters."""
    before = replies(repo, 'out-styles')
    bang = sum(before[w] == w.upper() + '!' for w in before)
    assert 10 < bang < 90 and sum(before[w][:3] == w.upper() for w in before) >= 95, before
    run(repo, 'train.py', *TUNE[:-1], *DPO, '--max_iters=40', '--eval_interval=40', '--out_dir=out-dpo')
    after = replies(repo, 'out-dpo')
    assert sum(after[w] == w.upper() + '!' for w in after) >= 90, after
    assert sum(after[w][:3] == w.upper() for w in after) >= 95, after


def test_dpo_bad_input_gets_one_line(repo, styles_run, tmp_path):
    bad = tmp_path / 'bad.jsonl'
    bad.write_text(json.dumps(dict(prompt='abc', chosen='ABC!', rejected='ABC.')) + '\n'
                   + json.dumps(dict(prompt='abd', chosen='ABD!')) + '\n')
    p = run(repo, 'prepare.py', 'bad_prefs', f'--input={bad}', '--tokenizer=data/shakespeare_char', ok=False)
    assert_one_line_error(p, f'{bad}:2', "'rejected' missing")
    for record, missing in ((dict(chosen='ABC!', rejected='ABC.'), 'prompt'),  # texts: replies to what?
                            (dict(prompt='abc', rejected='ABC.'), 'chosen')):  # a first record too is a pair
        bad.write_text(json.dumps(record) + '\n')
        p = run(repo, 'prepare.py', 'bad_prefs', f'--input={bad}', '--tokenizer=data/shakespeare_char', ok=False)
        assert_one_line_error(p, f'{bad}:1', f"'{missing}' missing")
    p = run(repo, 'train.py', '--dataset=letters_styles', *TUNE[:-1], '--init_from=out-styles/ckpt.pt',
            '--dpo_beta=0.1', '--out_dir=out-no', ok=False)
    assert_one_line_error(p, 'no dataset of preference pairs', "'chosen' and 'rejected'")
    p = run(repo, 'train.py', *TUNE[:-1], *DPO[:2], '--out_dir=out-no', ok=False)  # dpo_beta left 0
    assert_one_line_error(p, 'is a dataset of preference pairs', 'dpo_beta = 0.0')
    pairs = repo / 'data' / 'letters_prefs' / 'pairs.jsonl'
    p = run(repo, 'prepare.py', 'no_template', f'--input={pairs}', f'--tokenizer={tmp_path}',
            '--chat_template=model', ok=False)  # a folder without a model's template
    assert_one_line_error(p, '--chat_template=model', 'no folder with a chat_template')
