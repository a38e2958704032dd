"""
gguf_export.py against independent references: tiny random models built and saved with
transformers, written as GGUF, loaded by llama.cpp (llama-cpp-python). llama.cpp's logits must be
transformers' float32 logits at every position, its tokenizer must give the tokenizers library's ids
(and the text back), its greedy generation transformers' generate. Tokenizers: GPT-2's (from
data/gpt2.tiktoken, through export_hf.py), a byte-level BPE trained here, one behind Qwen2's,
Llama 3's and SmolLM's splits, and a chat one.
"""

import copy
import itertools
import json
import os
import shutil
import sys

import pytest
import torch

from gguf_export import write_gguf  # noqa: E402
from test_scripts import ROOT as REPO  # noqa: E402 (the repository: export_hf.py, data/)

gguf = pytest.importorskip('gguf')
llama_cpp = pytest.importorskip('llama_cpp')
tk = pytest.importorskip('tokenizers')
transformers = pytest.importorskip('transformers')

# tokenizer.json split regexes, as llama.cpp's src/llama-vocab.cpp quotes them
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEXT = "Hello  world!\n\n你好，世界 🙂 123 4567 it's   ROMEO:\n  a, b.\tc"
CHINESE = '你好，世界。今天天气很好，我们去公园散步吧。世界你好！' * 20
NUMBERS = [str(n) for n in range(1000, 1500)]
MARKERS = ['<|user|>', '<|assistant|>', '<|end|>']
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + "
                 "message['content'] + '<|end|>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


# tokenizers: each a folder with tokenizer.json and tokenizer_config.json


def write_json(path, obj):
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def byte_level(split=None, use_regex=True):
    """A pre-tokenizer: split (if any), then bytes to characters (with GPT-2's regex or not)."""
    last = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    return tk.pre_tokenizers.Sequence([split, last]) if split else last


def train(pre_tokenizer, data):
    """A byte-level BPE of 500 tokens (one of them <|endoftext|>) trained on data."""
    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.pre_tokenizer = pre_tokenizer
    bpe.decoder = tk.decoders.ByteLevel()
    bpe.train_from_iterator(data, tk.trainers.BpeTrainer(
        vocab_size=500, special_tokens=['<|endoftext|>'],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    return bpe


@pytest.fixture(scope='module')
def tokenizers_dir(tmp_path_factory):
    """{kind: folder} for 'gpt2', 'trained', 'qwen2', 'llama3', 'smollm' and 'chat'."""
    root = tmp_path_factory.mktemp('tokenizers')
    kinds = ('gpt2', 'trained', 'qwen2', 'llama3', 'smollm', 'chat')
    folders = {kind: root / kind for kind in kinds}
    for folder in folders.values():
        folder.mkdir()
    import export_hf  # the repository's GPT-2 tokenizer.json, from data/gpt2.tiktoken
    export_hf.write_gpt2_tokenizer(str(folders['gpt2']), 256, tk)

    # a byte-level BPE trained on Shakespeare and some Chinese, split as GPT-2 splits
    with open(os.path.join(REPO, 'data', 'shakespeare_char', 'input.txt'), encoding='utf-8') as f:
        text = f.read(100_000)
    train(byte_level(), [text, CHINESE]).save(str(folders['trained'] / 'tokenizer.json'))
    # one trained on whole lines and numbers, unsplit: its merges cross every split's boundaries,
    # so that a split other than the tokenizer's own changes the ids (test_splits_differ)
    bpe = train(byte_level(use_regex=False), text.splitlines(keepends=True) + [CHINESE] + NUMBERS)
    eot = bpe.token_to_id('<|endoftext|>')
    # behind Qwen2's split: its regex, then bytes to characters without GPT-2's regex
    bpe.pre_tokenizer = byte_level(tk.pre_tokenizers.Split(tk.Regex(QWEN2_PATTERN), 'isolated'),
                                   use_regex=False)
    bpe.save(str(folders['qwen2'] / 'tokenizer.json'))
    # Llama 3's: its regex, a word found whole in the vocabulary taken as it is, a bos added
    bpe.pre_tokenizer = byte_level(tk.pre_tokenizers.Split(tk.Regex(LLAMA3_PATTERN), 'isolated'),
                                   use_regex=False)
    bpe.model.ignore_merges = True
    bpe.post_processor = tk.processors.TemplateProcessing(
        single='<|endoftext|> $A', special_tokens=[('<|endoftext|>', eot)])
    bpe.save(str(folders['llama3'] / 'tokenizer.json'))
    # SmolLM's: digits one by one, then GPT-2's regex
    bpe = tk.Tokenizer.from_file(str(folders['qwen2'] / 'tokenizer.json'))
    bpe.pre_tokenizer = byte_level(tk.pre_tokenizers.Digits(individual_digits=True))
    bpe.save(str(folders['smollm'] / 'tokenizer.json'))
    # a chat model's: three markers and a template (as export_hf.py writes them)
    bpe = tk.Tokenizer.from_file(str(folders['trained'] / 'tokenizer.json'))
    bpe.add_special_tokens([tk.AddedToken(m, special=True, normalized=False) for m in MARKERS])
    bpe.save(str(folders['chat'] / 'tokenizer.json'))

    config = dict(tokenizer_class='PreTrainedTokenizerFast', bos_token='<|endoftext|>',
                  eos_token='<|endoftext|>')
    for kind in kinds[1:-1]:
        write_json(folders[kind] / 'tokenizer_config.json', config)
    write_json(folders['chat'] / 'tokenizer_config.json',
               dict(config, eos_token='<|end|>', chat_template=CHAT_TEMPLATE))
    return folders


def reference(folder):
    """The tokenizers library's reading of folder's tokenizer.json."""
    return tk.Tokenizer.from_file(str(folder / 'tokenizer.json'))


# models: tiny, random, every weight (biases and norm scales too) away from its default


MODELS = {  # name: (config class, tokenizer kind, config arguments)
    'llama': ('LlamaConfig', 'trained', dict(num_key_value_heads=4)),
    'llama_gqa_bias': ('LlamaConfig', 'qwen2', dict(
        num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        rope_theta=50000.0)),
    'llama_head_dim': ('LlamaConfig', 'chat', dict(num_key_value_heads=4, head_dim=24,
                                                   tie_word_embeddings=True)),
    'qwen3': ('Qwen3Config', 'qwen2', dict(num_key_value_heads=2, head_dim=24,
                                           tie_word_embeddings=True)),
    'gpt2_gelu': ('GPT2Config', 'gpt2', dict(activation_function='gelu')),
    'gpt2_gelu_new': ('GPT2Config', 'trained', dict(activation_function='gelu_new')),
    'llama3_split': ('LlamaConfig', 'llama3', {}),
    'smollm_split': ('LlamaConfig', 'smollm', {}),
}


def build(folder, config_class, tokenizer_dir, **overrides):
    """A random model of config_class, saved in folder with tokenizer_dir's files; the model."""
    ref = reference(tokenizer_dir)
    eot = ref.token_to_id('<|endoftext|>')
    shape = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256) \
        if config_class == 'GPT2Config' else dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)
    config = getattr(transformers, config_class)(
        vocab_size=ref.get_vocab_size(), initializer_range=0.2, bos_token_id=eot,
        eos_token_id=eot, pad_token_id=eot, **shape, **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # biases around 0, norm scales around 1: each must land in its place
                norm = 'norm' in name or '.ln_' in name
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if norm else 0.0))
    model.save_pretrained(folder)
    for name in ('tokenizer.json', 'tokenizer_config.json'):
        shutil.copy(tokenizer_dir / name, folder / name)
    return model


@pytest.fixture(scope='module')
def exported(tmp_path_factory, tokenizers_dir):
    """name -> (model, its folder, its GGUF file, write_gguf's summary), built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            config_class, kind, overrides = MODELS[name]
            folder = tmp_path_factory.mktemp(name)
            model = build(folder, config_class, tokenizers_dir[kind], **overrides)
            path = str(folder / 'model.gguf')
            cache[name] = model, folder, path, write_gguf(str(folder), path)
        return cache[name]
    return get


def load(path):
    # the KV cache in float32: its default, float16, alone moves these logits by ~1e-2
    return llama_cpp.Llama(model_path=path, n_ctx=128, n_batch=128, logits_all=True, n_threads=1,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                           verbose=False)


class GgmlGelu(torch.nn.Module):
    """ggml's GELU on the CPU (ggml-cpu/vec.h: ggml_vec_gelu_f32 under GGML_GELU_FP16): the tanh
    form, from a float16 table at the input rounded to float16; 0 below -10, x above 10."""

    def forward(self, x):
        h = x.half().float()
        y = (0.5 * h * (1 + torch.tanh(0.7978845608 * h * (1 + 0.044715 * h * h)))).half().float()
        return torch.where(x <= -10, 0.0, torch.where(x >= 10, x, y))


# the tests


@pytest.mark.parametrize('name', list(MODELS))
def test_logits(exported, name):
    """llama.cpp's logits at every position are transformers' float32 logits."""
    model, folder, path, summary = exported(name)
    assert summary.startswith(f'wrote {path}') and '\n' not in summary
    ids = reference(folder).encode(TEXT).ids
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm = load(path)
    llm.eval(ids)
    got = llm.scores[:len(ids)]
    assert expected.std() > 0.5  # logits far from 0: a wrong layout shows
    err = abs(got - expected).max()
    if name.startswith('gpt2'):
        # ggml's GELU rounds its input and output to float16 (GgmlGelu), which alone moves these
        # logits by ~2e-3, for 'gelu' and 'gelu_new' alike; with transformers' GELU swapped for
        # ggml's they agree within 1e-3 (what is left: inputs that differ by float32 rounding
        # and fall on either side of a float16 rounding boundary)
        assert err < 5e-3, f'{name}: max |llama.cpp - transformers| = {err:.2e}'
        model = copy.deepcopy(model)  # the fixture's stays as transformers built it
        for block in model.transformer.h:
            block.mlp.act = GgmlGelu()
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()
        err = abs(got - expected).max()
    assert err < 1e-3, f'{name}: max |llama.cpp - transformers| = {err:.2e}'


@pytest.mark.parametrize('name', ['llama', 'llama_gqa_bias', 'llama_head_dim', 'gpt2_gelu',
                                  'llama3_split', 'smollm_split'])
def test_tokenizer(exported, name):
    """llama.cpp splits mixed text into the tokenizer.json's ids, and detokenizes them back."""
    model, folder, path, summary = exported(name)
    llm, ref = load(path), reference(folder)
    expected = ref.encode(TEXT, add_special_tokens=False).ids
    assert len(set(expected)) > 10
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == expected
    assert llm.detokenize(expected).decode() == TEXT
    # with what the tokenizer adds by itself: a bos for Llama 3's, nothing for the others
    assert llm.tokenize(TEXT.encode(), add_bos=True, special=False) == ref.encode(TEXT).ids


@pytest.mark.parametrize('name', ['llama_gqa_bias', 'qwen3', 'gpt2_gelu'])
def test_generate(exported, name):
    """Greedy generation in llama.cpp gives transformers' generate(do_sample=False) tokens."""
    model, folder, path, summary = exported(name)
    prompt = reference(folder).encode('To be, or not to be').ids
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=10)
    expected = out[0, len(prompt):].tolist()  # fewer than 10 where it reached eos
    got = list(itertools.islice(load(path).generate(prompt, temp=0.0, repeat_penalty=1.0), 10))
    assert len(set(expected)) > 1 and got[:len(expected)] == expected


def test_chat_markers(exported):
    """Chat markers are control tokens, the template is stored, llama.cpp finds markers in text."""
    model, folder, path, summary = exported('llama_head_dim')
    field = gguf.GGUFReader(path).fields['tokenizer.ggml.token_type']
    types = [int(field.parts[i][0]) for i in field.data]
    ref = reference(folder)
    for marker in MARKERS:
        assert types[ref.token_to_id(marker)] == gguf.TokenType.CONTROL
    # the rest: <|endoftext|> (special too) and the BPE's own tokens
    assert types.count(gguf.TokenType.CONTROL) == len(MARKERS) + 1
    assert types.count(gguf.TokenType.NORMAL) == len(types) - len(MARKERS) - 1
    llm = load(path)
    assert llm.metadata['tokenizer.chat_template'] == CHAT_TEMPLATE
    assert llm.token_eos() == ref.token_to_id('<|end|>')  # tokenizer_config.json's eos_token
    chat = '<|user|>What say you?<|end|><|assistant|>'
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == ref.encode(chat).ids


def test_splits_differ(tokenizers_dir):
    """The Qwen2, Llama 3 and SmolLM tokenizers share one BPE, and TEXT's ids differ between any
    two of their splits and GPT-2's: test_tokenizer fails where llama.cpp splits another way."""
    refs = [reference(tokenizers_dir[kind]) for kind in ('qwen2', 'llama3', 'smollm', 'qwen2')]
    refs[-1].pre_tokenizer = byte_level()
    assert len({tuple(ref.encode(TEXT, add_special_tokens=False).ids) for ref in refs}) == 4


def test_pre_tokenizer_names(exported):
    """The pre-tokenizer's name follows tokenizer.json's split, whatever the architecture."""
    for name, pre in [('llama', 'gpt-2'), ('llama_gqa_bias', 'qwen2'), ('qwen3', 'qwen2'),
                      ('gpt2_gelu', 'gpt-2'), ('llama3_split', 'llama3'),
                      ('smollm_split', 'smollm')]:
        assert load(exported(name)[2]).metadata['tokenizer.ggml.pre'] == pre, name


# refusals: one line that names the problem and the fix, and no file written


def copy_folder(exported, name, tmp_path):
    folder = tmp_path / 'hf'
    shutil.copytree(exported(name)[1], folder, ignore=shutil.ignore_patterns('*.gguf'))
    return folder


def edit_json(path, **changes):
    with open(path, encoding='utf-8') as f:
        obj = json.load(f)
    write_json(path, {**obj, **changes})


def refused(folder, match):
    with pytest.raises(ValueError, match=match) as e:
        write_gguf(str(folder), str(folder.parent / 'out.gguf'))
    assert '\n' not in str(e.value) and os.listdir(folder.parent) == [folder.name]
    return str(e.value)


def test_refuses_character_vocabulary(exported, tmp_path):
    folder = copy_folder(exported, 'llama', tmp_path)
    chars = sorted(set(TEXT))
    vocab = tk.Tokenizer(tk.models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token='a'))
    vocab.save(str(folder / 'tokenizer.json'))
    message = refused(folder, "WordLevel tokenizer.*llama.cpp's tokenizers cannot express")
    assert 'transformers' in message


def test_refuses_unknown_split(exported, tmp_path):
    """A split llama.cpp has no name for; Llama 3's without its whole-word lookup."""
    folder = copy_folder(exported, 'llama3_split', tmp_path)
    bpe = reference(folder)
    bpe.model.ignore_merges = False
    bpe.save(str(folder / 'tokenizer.json'))
    refused(folder, "ignore_merges is False, llama.cpp's 'llama3' has True")
    bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.save(str(folder / 'tokenizer.json'))
    refused(folder, r'pre-tokenizer ByteLevel\(add_prefix_space=True')


def test_refuses_config(exported, tmp_path):
    """RoPE scaling (either spelling), another architecture, Qwen3's attention biases."""
    folder = copy_folder(exported, 'llama', tmp_path)
    edit_json(folder / 'config.json', rope_scaling=dict(rope_type='linear', factor=2.0))
    refused(folder, 'RoPE scaling')
    edit_json(folder / 'config.json', rope_scaling=None,
              rope_parameters=dict(rope_type='linear', factor=2.0, rope_theta=10000.0))
    refused(folder, 'RoPE scaling')
    edit_json(folder / 'config.json', architectures=['MistralForCausalLM'])
    refused(folder, 'MistralForCausalLM is not one gguf_export writes')
    shutil.rmtree(folder)
    folder = copy_folder(exported, 'qwen3', tmp_path)
    edit_json(folder / 'config.json', attention_bias=True)
    refused(folder, 'attention biases')


def test_refuses_sliding_window(tokenizers_dir, tmp_path):
    folder = tmp_path / 'hf'
    build(folder, 'Qwen3Config', tokenizers_dir['qwen2'], use_sliding_window=True,
          sliding_window=16, max_window_layers=1)
    refused(folder, 'sliding-window attention')


def test_refuses_unknown_tensor(exported, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = copy_folder(exported, 'llama', tmp_path)
    weights = load_file(folder / 'model.safetensors')
    save_file({**weights, 'model.extra.weight': torch.zeros(3)}, folder / 'model.safetensors')
    refused(folder, 'model.extra.weight has no place')


def test_error_leaves_earlier_file(exported, tmp_path, monkeypatch):
    """An error halfway through writing (here the disk fills up after the header) leaves the file
    that was there, and no temporary file."""
    def disk_full(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(gguf.GGUFWriter, 'write_tensors_to_file', disk_full)
    path = tmp_path / 'out.gguf'
    path.write_bytes(b'earlier')
    with pytest.raises(OSError, match='No space left'):
        write_gguf(str(exported('llama')[1]), str(path))
    assert path.read_bytes() == b'earlier' and os.listdir(tmp_path) == ['out.gguf']


def test_missing_gguf(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, 'gguf', None)  # import gguf now raises ImportError
    with pytest.raises(ImportError, match='pip install gguf'):
        write_gguf(str(exported('llama')[1]), 'unused.gguf')
