"""
GPT-2 in the Hugging Face layout, both ways. GPT.from_pretrained (model.py) reads a folder in it
(OpenAI's GPT-2 from the hub, or any local one) with download_gpt2, read_config and read_weights
below. Run as a script, this file writes a checkpoint of train.py as such a folder, which
transformers (and the tools built on it) load as it loads OpenAI's GPT-2:

    python export_hf.py --out_dir=out-shakespeare --hf_dir=hf-model
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'hf-model')('ROMEO:'))"

The folder holds config.json, model.safetensors and the tokenizer: for GPT-2 BPE data vocab.json,
merges.txt and tokenizer.json, derived from data/gpt2.tiktoken; for data with its own tokenizer.json,
a copy of it; for a character vocabulary nothing (it has no Hugging Face form). Only bias=True
models have GPT-2's layout. It differs from model.py's in two ways: names may lack the
'transformer.' prefix, and c_attn, c_proj and c_fc store their weights transposed, (in, out),
because OpenAI's code multiplied by them through a "Conv1D" layer rather than nn.Linear.
"""

import glob
import json
import os
import shutil

import torch

import configurator
from configurator import fail
from model import load_checkpoint
from prepare import DATA_DIR, EOT_NAMES, GPT2_EOT, DataError, gpt2_encoding, load_meta, need

# -----------------------------------------------------------------------------
# settings
out_dir = 'out'  # the folder holding train.py's ckpt.pt
hf_dir = 'out-hf'  # the Hugging Face folder to write
overwrite = False  # replace hf_dir if it holds an earlier export (a config.json)
# -----------------------------------------------------------------------------


# reading: GPT.from_pretrained (model.py)

# the hub's GPT-2s as (n_layer, n_head, n_embd): 124M, 350M, 774M and 1558M parameters
GPT2_SIZES = {'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024),
              'gpt2-large': (36, 20, 1280), 'gpt2-xl': (48, 25, 1600)}
HF_CONV1D = ('c_attn.weight', 'c_proj.weight', 'c_fc.weight')  # weights HF's GPT-2 stores transposed, (in, out)
HF_GELU = {'gelu_new': 'tanh', 'gelu_pytorch_tanh': 'tanh', 'gelu': 'exact'}  # activation_function -> GPTConfig.gelu


def download_gpt2(name):
    """The hub's GPT-2 folder, cached by huggingface_hub (which reads HF_ENDPOINT and HF_HUB_OFFLINE)."""
    if name not in GPT2_SIZES:
        raise ValueError(f"'{name}' is not a folder, nor one of {', '.join(GPT2_SIZES)}")
    try:
        from huggingface_hub import snapshot_download  # comes with transformers
    except ImportError:
        raise ImportError(f"downloading '{name}' needs the Hugging Face hub client: pip install transformers") from None
    repo = f'openai-community/{name}'  # where OpenAI's models live on the hub ('gpt2' alone is a redirect)
    try:
        return snapshot_download(repo, allow_patterns=['config.json', 'model.safetensors'])
    except Exception as e:  # offline, a proxy, a wrong HF_ENDPOINT, a revoked repo...
        first_line = (str(e).strip().splitlines() or [''])[0]
        raise ValueError(f"cannot download '{name}' from the Hugging Face hub ({type(e).__name__}: {first_line}); "
                         f"where it is reachable, run 'hf download {repo} config.json model.safetensors "
                         f"--local-dir {name}', copy that folder here and pass its path instead") from None


def read_config(folder):
    """GPTConfig's arguments for the GPT-2 of a folder's config.json (transformers' GPT2Config)."""
    path = os.path.join(folder, 'config.json')
    try:
        with open(path, encoding='utf-8') as f:
            hf = json.load(f)
        args = dict(n_layer=hf['n_layer'], n_head=hf['n_head'], n_embd=hf['n_embd'], block_size=hf['n_positions'],
                    vocab_size=hf['vocab_size'], bias=True, gelu=HF_GELU.get(hf.get('activation_function', 'gelu_new')))
    except (OSError, ValueError, KeyError, TypeError) as e:  # no file, not JSON, a missing key, not a dict
        raise ValueError(f"{path} is not a GPT-2 config.json ({type(e).__name__}: {e})") from None
    # refuse the settings this model does not compute, rather than give other logits
    unsupported = [f"{k}={hf.get(k)!r}" for k, ok in [
        ('model_type', hf.get('model_type') == 'gpt2'),
        ('activation_function', args['gelu'] is not None),
        ('n_inner', hf.get('n_inner') in (None, 4 * hf['n_embd'])),
        ('layer_norm_epsilon', hf.get('layer_norm_epsilon', 1e-5) == 1e-5),
        ('scale_attn_weights', hf.get('scale_attn_weights', True)),
        ('scale_attn_by_inverse_layer_idx', not hf.get('scale_attn_by_inverse_layer_idx', False)),
    ] if not ok]
    if unsupported:
        raise ValueError(f"{path}: this GPT does not implement {', '.join(unsupported)}")
    return args


def read_files(folder):
    """{name: tensor} of a Hugging Face folder: model.safetensors or pytorch_model.bin, or the
    shards of a large model (model-00001-of-00003.safetensors, ...)."""
    paths = (sorted(glob.glob(os.path.join(glob.escape(folder), 'model*.safetensors'))) or
             sorted(glob.glob(os.path.join(glob.escape(folder), 'pytorch_model*.bin'))))
    if not paths:
        raise ValueError(f"{folder} has no model.safetensors nor pytorch_model.bin")
    if paths[0].endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"reading {paths[0]} needs safetensors: pip install safetensors") from None
    else:  # weights_only: the file can hold only tensors, so loading it never runs code (a pickle can)
        load_file = lambda path: torch.load(path, map_location='cpu', weights_only=True)
    state_dict = {}
    for path in paths:
        try:
            state_dict.update(load_file(path))
        except Exception as e:  # truncated, or not what its name says
            first_line = (str(e).strip().splitlines() or [''])[0]
            raise ValueError(f"cannot read {path} ({type(e).__name__}: {first_line})") from None
    return state_dict


def read_weights(folder):
    """The weights of a folder as model.py's GPT names them: its state_dict (lm_head tied to wte)."""
    weights = read_files(folder)
    lm_head = weights.pop('lm_head.weight', None)  # absent when saved tied, as transformers does
    state_dict = {}
    for k, v in weights.items():
        k = k.removeprefix('transformer.')  # GPT2LMHeadModel's files say transformer.h.0..., GPT2Model's h.0...
        if k.endswith(('.attn.bias', '.attn.masked_bias')):
            continue  # the causal mask, which older transformers saved as a buffer: not a weight
        state_dict['transformer.' + k] = v.t() if k.endswith(HF_CONV1D) else v  # Conv1D's (in, out) -> (out, in)
    wte = state_dict.get('transformer.wte.weight')
    if wte is not None:
        if lm_head is not None and not torch.equal(lm_head, wte):
            raise ValueError(f"{folder}: lm_head differs from wte, but this GPT ties them (weight tying, as GPT-2)")
        state_dict['lm_head.weight'] = wte
    return state_dict


# writing: this script, export()


def byte_to_unicode():
    """GPT-2's spelling of bytes as printable characters, which vocab.json and merges.txt use: the
    188 printable Latin-1 bytes stand for themselves, the 68 others (space, newline, controls, ...)
    for chr(256), chr(257), ... in byte order (OpenAI's encoder.py, bytes_to_unicode)."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def gpt2_vocab_and_merges():
    """vocab.json's {token: id} and merges.txt's pairs, from tiktoken's ranks. A token's rank is its
    id and its merge's priority; BPE made it from two older tokens, which we find by re-running BPE
    on its bytes until two pieces are left (merges.txt in rank order then encodes as tiktoken does)."""
    enc = gpt2_encoding()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i != GPT2_EOT}
    spell = byte_to_unicode()
    word = lambda token: ''.join(spell[b] for b in token)
    vocab = {word(token): i for token, i in ranks.items()} | {'<|endoftext|>': GPT2_EOT}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # merge the adjacent pair of lowest rank, as tiktoken does
            i = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], rank))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:  # single bytes are the base alphabet, not merges
            assert all(ranks.get(part, rank) < rank for part in parts), token  # two older tokens
            merges.append((word(parts[0]), word(parts[1])))
    return vocab, merges  # 50,257 tokens (256 bytes, 50,000 merges, <|endoftext|>)


def write_gpt2_tokenizer(folder, block_size, tk):
    vocab, merges = gpt2_vocab_and_merges()
    with open(os.path.join(folder, 'vocab.json'), 'w', encoding='utf-8') as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, 'merges.txt'), 'w', encoding='utf-8') as f:
        f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
    tokens = dict(bos_token='<|endoftext|>', eos_token='<|endoftext|>', unk_token='<|endoftext|>')
    write_json(os.path.join(folder, 'tokenizer_config.json'), dict(
        tokenizer_class='GPT2Tokenizer', model_max_length=block_size, add_prefix_space=False, **tokens))
    # tokenizer.json: the same BPE for the tokenizers library (tk), which transformers' fast tokenizers use
    tok = tk.Tokenizer(tk.models.BPE(vocab, merges))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split into words
    tok.decoder = tk.decoders.ByteLevel()
    tok.add_special_tokens([tk.AddedToken('<|endoftext|>', special=True)])
    tok.save(os.path.join(folder, 'tokenizer.json'))


def write_json(path, obj):
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=2)


def export():
    """Write the checkpoint out_dir/ckpt.pt as the Hugging Face folder hf_dir (the settings above)."""
    # the checkpoint and the data it was trained on
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.isfile(ckpt_path):
        fail(f"no checkpoint at {ckpt_path}: train one first (python train.py ...), or fix --out_dir")
    try:
        model, checkpoint = load_checkpoint(ckpt_path, 'cpu')
        dataset = checkpoint['config']['dataset']
        meta = load_meta(os.path.join(DATA_DIR, dataset))  # the vocabulary's true size and its tokenizer
        safetensors = need('safetensors.torch', 'safetensors')
        tk = need('tokenizers', 'tokenizers') if meta['tokenizer']['type'] != 'char' else None  # for tokenizer.json
    except (ValueError, DataError) as e:
        fail(e)
    config = model.config
    if not config.bias:
        fail(f"{ckpt_path} is a bias=False model, but GPT-2's layout (and transformers' GPT2LMHeadModel) has biases "
             f"in every Linear and LayerNorm: train with --bias=True to export")
    switches = [k for k in ('rope', 'rmsnorm', 'swiglu', 'qk_norm') if getattr(config, k)] + \
        (['n_kv_head'] if config.n_kv_head not in (0, config.n_head) else [])
    if switches:
        fail(f"{ckpt_path} uses {', '.join(switches)}, which GPT-2's layout (GPT2LMHeadModel) does not have: only "
             f"models with every architecture switch off export to it")
    vocab_size, tokenizer = meta['vocab_size'], meta['tokenizer']['type']
    if vocab_size > config.vocab_size:
        fail(f"data/{dataset} now has a vocabulary of {vocab_size:,}, the model {config.vocab_size:,}: "
             f"prepare the dataset again as it was for this model")
    eot = GPT2_EOT if tokenizer == 'gpt2' else None  # the end-of-text token, which config.json names bos and eos
    if tokenizer == 'tokenizers':
        tokenizer_file = os.path.join(DATA_DIR, dataset, meta['tokenizer']['file'])
        try:
            tok = tk.Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # missing, or not a tokenizer file
            fail(f"cannot read {tokenizer_file} ({e}): run 'python prepare.py {dataset}' again")
        eot = next((i for i in map(tok.token_to_id, EOT_NAMES) if i is not None), None)
    if os.path.isfile(hf_dir) or (os.path.isdir(hf_dir) and os.listdir(hf_dir)):
        if not (overwrite and os.path.isfile(os.path.join(hf_dir, 'config.json'))):
            fail(f"{hf_dir} already exists: choose another --hf_dir, or pass --overwrite=True to replace an "
                 f"earlier export")

    # the weights in transformers' names and shapes
    weights = {}
    for k, v in model.state_dict().items():
        if k == 'lm_head.weight':
            continue  # the same tensor as wte: transformers ties them again on loading (tie_word_embeddings)
        if k == 'transformer.wte.weight':
            v = v[:vocab_size]  # train.py pads GPT-2's 50,257 tokens to 50,304: the padding rows are never used
        weights[k] = (v.t() if k.endswith(HF_CONV1D) else v).contiguous()  # HF's Conv1D: (in, out)
    hf_config = dict(
        architectures=['GPT2LMHeadModel'], model_type='gpt2',
        vocab_size=vocab_size, n_positions=config.block_size, n_ctx=config.block_size,  # n_ctx: older readers
        n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head, n_inner=None,  # None: 4 * n_embd
        # transformers' 'gelu' is the exact GELU train.py's models use; 'gelu_new' the tanh form of GPT-2's weights
        activation_function='gelu_new' if config.gelu == 'tanh' else 'gelu',
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        layer_norm_epsilon=1e-5, initializer_range=0.02, scale_attn_weights=True, tie_word_embeddings=True,
        bos_token_id=eot, eos_token_id=eot, use_cache=True, dtype='float32',
    )

    # write everything into hf_dir.tmp, then rename it: an error or Ctrl-C never leaves a half-written hf_dir
    tmp = hf_dir.rstrip('/') + '.tmp'
    try:
        for leftover in (tmp, tmp + '.old'):  # of an earlier export that was interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        os.makedirs(tmp)
        safetensors.torch.save_file(weights, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
        write_json(os.path.join(tmp, 'config.json'), hf_config)
        if tokenizer == 'gpt2':
            write_gpt2_tokenizer(tmp, config.block_size, tk)
            written = "GPT-2's tokenizer (vocab.json, merges.txt, tokenizer.json)"
        elif tokenizer == 'tokenizers':
            shutil.copy(tokenizer_file, os.path.join(tmp, 'tokenizer.json'))
            write_json(os.path.join(tmp, 'tokenizer_config.json'), dict(tokenizer_class='PreTrainedTokenizerFast',
                       model_max_length=config.block_size, eos_token=None if eot is None else tok.id_to_token(eot)))
            written = f"data/{dataset}'s tokenizer.json"
        else:
            written = (f"no tokenizer: a character vocabulary has no Hugging Face form; token i is character i of "
                       f"data/{dataset}/meta.json's \"chars\"")
        if os.path.exists(hf_dir):  # an earlier export (checked above), or an empty folder: moved aside, then gone
            os.replace(hf_dir, tmp + '.old')
        os.replace(tmp, hf_dir)
        shutil.rmtree(tmp + '.old', ignore_errors=True)
    except OSError as e:
        fail(f"cannot write {hf_dir} ({e.strerror or e})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a failure: what was written so far (renamed away on success)
    print(f"wrote {hf_dir}: a GPT-2 of {config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, "
          f"vocab {vocab_size:,}, context {config.block_size}; {written}")
    print(f"load it with: GPT2LMHeadModel.from_pretrained('{hf_dir}') (transformers), "
          f"or GPT.from_pretrained('{hf_dir}')")


if __name__ == '__main__':
    configurator.configure(globals())
    export()
