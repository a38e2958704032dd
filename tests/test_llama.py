"""
The Llama family read into model.py: tiny random LlamaForCausalLM and Qwen3ForCausalLM built by
transformers itself (an implementation written independently of ours), saved with a tokenizer and
a chat template, then loaded by hf_models.from_pretrained and by the real scripts (sample.py,
chat.py, train.py, export_hf.py) as subprocesses. Offline, CPU, float32.
"""

import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.parse

import pytest
import torch

transformers = pytest.importorskip('transformers')  # a test requirement, not a core one

from hf_models import from_pretrained  # noqa: E402
from test_scripts import ROOT, assert_one_line_error, repo, run  # noqa: E402,F401 (repo is a fixture)
from test_model import one_thread  # noqa: F401 (an autouse fixture: one torch thread)

TOL = 1e-4  # float32 logits of the two implementations (the bound)
# ChatML, the layout of SmolLM2-Instruct's and Qwen's templates
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
TEXT = "ROMEO: But soft, what light through yonder window breaks? 你好，世界 🙂 123\n\n  two spaces"
SHAPES = {  # (config class, arguments): what each tiny model exercises
    'llama': ('LlamaConfig', dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=50000.0)),
    'llama_bias': ('LlamaConfig', dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    'qwen3': ('Qwen3Config', dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
}


def bpe_tokenizer(folder):
    """A byte-level BPE of 400 ids trained on tiny Shakespeare's first 100 kB (tokenizers), with
    ChatML's markers, as a model's folder holds it: tokenizer.json and tokenizer_config.json."""
    tk = pytest.importorskip('tokenizers')
    with open(os.path.join(ROOT, 'data', 'shakespeare_char', 'input.txt'), encoding='utf-8') as f:
        text = f.read(100_000)
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=400, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'])
    tok.train_from_iterator([text], trainer=trainer)
    tok.save(os.path.join(folder, 'tokenizer.json'))
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
        json.dump(dict(tokenizer_class='PreTrainedTokenizerFast', chat_template=CHATML, eos_token='<|im_end|>',
                       pad_token='<|endoftext|>', bos_token=None, clean_up_tokenization_spaces=False), f)
    return tok


def tiny_llama(folder, shape):
    """A random model of SHAPES[shape] (2 layers, 64 wide), weights drawn with std 0.1 so that
    the logits depend on the context, saved with save_pretrained and the tokenizer."""
    os.makedirs(folder, exist_ok=True)
    tok = bpe_tokenizer(folder)
    name, args = SHAPES[shape]
    config = getattr(transformers, name)(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, initializer_range=0.1,
        eos_token_id=tok.token_to_id('<|im_end|>'), bos_token_id=None, pad_token_id=0, **args)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith('norm.weight'):  # RMSNorm gains start at 1: move them, so a wrong mapping shows
                p.uniform_(0.5, 1.5)
            elif n.endswith('bias'):
                p.normal_(0.0, 0.1)
    hf.save_pretrained(folder)
    return hf


@pytest.fixture(scope='module', params=sorted(SHAPES))
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return path, tiny_llama(path, request.param)


def test_logits_equal_transformers(folder):
    path, hf = folder
    ours = from_pretrained(str(path)).eval()
    idx = torch.randint(0, hf.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(idx).logits
        got = ours(idx, idx)[0]
    assert want.abs().max() > 1.0  # logits that mean something
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert (ours.config.tie_embeddings, ours.config.n_kv_head in (0, hf.config.num_key_value_heads)) == \
        (hf.config.tie_word_embeddings, True)


def greedy_text(path, hf, start, n):
    """transformers' greedy continuation of start by n tokens, decoded as sample.py prints it."""
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    prompt = hf_tok.encode(start, add_special_tokens=False)
    gen = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)[0].tolist()
    eot = hf_tok.convert_tokens_to_ids('<|endoftext|>')
    new = gen[len(prompt):]
    new = new[:new.index(eot)] if eot in new else new  # sample.py stops at the end-of-text token
    return hf_tok.decode(prompt + new).replace('\r\n', '\n').replace('\r', '\n')  # as a pipe reads it


def test_sample_greedy_equals_transformers_generate(repo, folder):
    path, hf = folder
    p = run(repo, 'sample.py', f'--init_from={path}', '--start=ROMEO: But soft', '--temperature=0',
            '--max_new_tokens=12', '--num_samples=1', '--device=cpu', '--dtype=float32')
    assert p.stdout.split('\n---------------')[0] == greedy_text(path, hf, 'ROMEO: But soft', 12)


def stand_in_hub(folder, repo_id):
    """An HTTP server on 127.0.0.1 that answers huggingface_hub as the hub would for repo_id, whose
    files are folder's, at one commit: the revision, the file tree, each file's headers and bytes."""
    sha, files = '1' * 40, sorted(os.listdir(folder))

    class Hub(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer(self, body, headers=()):
            self.send_response(200)
            for k, v in (('Content-Length', str(len(body))), *headers):
                self.send_header(k, v)
            self.end_headers()
            if self.command == 'GET':
                self.wfile.write(body)

        def do_GET(self):
            path = urllib.parse.urlparse(self.path).path
            if path == f'/api/models/{repo_id}/revision/main':
                return self.answer(json.dumps(dict(id=repo_id, sha=sha)).encode())
            if path == f'/api/models/{repo_id}/tree/{sha}':
                return self.answer(json.dumps([dict(type='file', path=f, oid=f, size=os.path.getsize(
                    os.path.join(folder, f))) for f in files]).encode())
            name = path.removeprefix(f'/{repo_id}/resolve/{sha}/')
            if name in files:
                body = open(os.path.join(folder, name), 'rb').read()
                return self.answer(body, [('X-Repo-Commit', sha), ('ETag', f'"{len(body)}-{name}"')])
            self.send_response(404)
            self.send_header('Content-Length', '0')
            self.end_headers()
        do_HEAD = do_GET

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_hub_repository_downloads_through_hf_endpoint(repo, tmp_path):
    """init_from='someone/tiny' (a repository name, not a folder): downloads.download_model fetches it
    with huggingface_hub from a stand-in hub (HF_ENDPOINT) into an empty HF_HOME, and sample.py then
    continues the prompt as transformers does with the same weights (Qwen3's shape: one is enough)."""
    path = tmp_path / 'served'
    hf = tiny_llama(path, 'qwen3')
    home = tmp_path / 'hf-home'
    server = stand_in_hub(path, 'someone/tiny')
    env = dict(os.environ, HF_ENDPOINT=f'http://127.0.0.1:{server.server_port}', HF_HOME=str(home))
    try:
        p = subprocess.run([sys.executable, 'sample.py', '--init_from=someone/tiny', '--start=ROMEO: But soft',
                            '--temperature=0', '--max_new_tokens=12', '--num_samples=1', '--device=cpu',
                            '--dtype=float32'], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
    assert p.returncode == 0, p.stderr
    assert p.stdout.split('\n---------------')[0] == greedy_text(path, hf, 'ROMEO: But soft', 12)
    cached = {f.name for f in home.rglob('*') if f.is_file() and 'snapshots' in f.parts}
    assert {'config.json', 'model.safetensors', 'tokenizer.json'} <= cached, cached


def test_refused_folders_get_one_line(repo, tmp_path):
    """rope scaling (Llama 3.1's), an architecture model.py does not compute, biases on q/k/v only
    (Qwen2's): one line naming the field, exit status 1; a template that reaches for Python's
    internals: one line, exit status 1."""
    path = tmp_path / 'm'
    tiny_llama(path, 'llama')
    config = json.loads((path / 'config.json').read_text())
    scaled = dict(config, rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_position_embeddings=64))
    for changed, fragment in ((scaled, 'rope_scaling'), (dict(config, model_type='mistral'), "'mistral'"),
                              (dict(config, model_type='qwen2'), "'qwen2'"),
                              (dict(config, hidden_act='gelu'), "hidden_act='gelu'")):
        (path / 'config.json').write_text(json.dumps(changed))
        p = run(repo, 'sample.py', f'--init_from={path}', '--max_new_tokens=2', '--device=cpu', ok=False)
        assert_one_line_error(p, fragment)
    (path / 'config.json').write_text(json.dumps(config))
    tok_config = json.loads((path / 'tokenizer_config.json').read_text())
    tok_config['chat_template'] = "{{ ''.__class__.__mro__ }}"
    (path / 'tokenizer_config.json').write_text(json.dumps(tok_config))
    p = subprocess.run([sys.executable, 'chat.py', f'--init_from={path}', '--device=cpu'], cwd=repo,
                       input='hello\n', capture_output=True, text=True, timeout=120)
    assert_one_line_error(p, 'chat template', 'unsafe')


def test_chat_py_speaks_in_the_models_own_template(repo, folder):
    """chat.py on an instruct model's folder feeds the ids of its template (apply_chat_template with
    add_generation_prompt=True), and its greedy reply is transformers' generate up to the eos."""
    from conversations import render_prompt
    from hf_models import hf_tokenizer_of
    path, hf = folder
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    history = [dict(role='user', content='But soft, 你好 🙂')]
    prompt = hf_tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert render_prompt(hf_tokenizer_of(str(path)), history) == list(prompt)
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    eos = hf_tok.convert_tokens_to_ids('<|im_end|>')
    reply = out[:out.index(eos)] if eos in out else out
    p = subprocess.run([sys.executable, 'chat.py', f'--init_from={path}', '--temperature=0', '--device=cpu',
                        '--dtype=float32', '--max_new_tokens=10'], cwd=repo, input=history[0]['content'] + '\n',
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout == hf_tok.decode(reply).replace('\r\n', '\n').replace('\r', '\n') + '\n'


CHATS = [{'messages': [{'role': 'user', 'content': w}, {'role': 'assistant', 'content': w.upper()}]}
         for w in 'abc hello world romeo juliet tybalt nurse friar mercutio benvolio'.split() * 4]
TUNE = ['--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=1', '--eval_iters=2',
        '--device=cpu', '--dtype=float32', '--plot=False', '--learning_rate=1e-3', '--eval_interval=2']


@pytest.mark.parametrize('template', ['ours', 'model'])
def test_finetune_a_folder_on_conversations(repo, folder, template, tmp_path):
    """train.py --init_from=FOLDER on conversations prepared with its tokenizer (our template: its
    markers added as special tokens; or the model's own) trains, resumes bit-identically, and
    export_hf.py writes a folder transformers loads with our logits."""
    from checkpoint import load_checkpoint
    from test_resume import assert_same_weights, weights
    path, _ = folder
    (tmp_path / 'c.jsonl').write_text(''.join(json.dumps(c) + '\n' for c in CHATS))
    name = f'chat_{path.name}_{template}'
    run(repo, 'prepare.py', name, f'--input={tmp_path / "c.jsonl"}', f'--tokenizer={path}',
        f'--chat_template={template}')
    args = [*TUNE, f'--dataset={name}', f'--init_from={path}']
    run(repo, 'train.py', *args, '--max_iters=4', f'--out_dir=out-{name}-4')
    run(repo, 'train.py', *args, '--max_iters=2', f'--out_dir=out-{name}-2')
    run(repo, 'train.py', *args, '--max_iters=4', '--init_from=resume', f'--out_dir=out-{name}-2')
    assert_same_weights(weights(repo, f'out-{name}-4'), weights(repo, f'out-{name}-2'))
    run(repo, 'export_hf.py', f'--out_dir=out-{name}-4', f'--hf_dir={tmp_path / "hf"}')
    ours, _ = load_checkpoint(str(repo / f'out-{name}-4' / 'ckpt.pt'), 'cpu')
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').eval()
    idx = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours.eval()(idx, idx)[0][..., :hf.config.vocab_size],
                                   atol=TOL, rtol=0)
    p = subprocess.run([sys.executable, 'chat.py', f'--out_dir=out-{name}-4', '--temperature=0', '--device=cpu',
                        '--max_new_tokens=4'], cwd=repo, input='hello\n', capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
