"""
Writes a checkpoint of train.py as a Hugging Face GPT-2 folder, which transformers (and the tools
built on it) load as they load OpenAI's GPT-2 (checkpoint.py reads such folders: from_pretrained):

    python export_hf.py --out_dir=out-shakespeare --hf_dir=hf-model
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'hf-model')('ROMEO:'))"

The folder holds config.json, model.safetensors and the tokenizer: for GPT-2 BPE data vocab.json,
merges.txt and tokenizer.json, derived from data/gpt2.tiktoken; for data with its own tokenizer.json,
a copy of it; for a character vocabulary nothing (it has no Hugging Face form). A chat model (tokenizer.py's
template) adds its markers as special tokens and a chat_template to tokenizer_config.json, so that
tokenizer.apply_chat_template(messages, add_generation_prompt=True) gives the ids chat.py feeds, and greedy
generate (which stops at the markers: generation_config.json) gives chat.py --temperature=0's reply. Only models
without architecture switches have GPT-2's layout (checkpoint.py says how it differs from ours); a bias=False
model's biases are written as zeros.
"""

import json
import os
import shutil

import torch

import configurator
from checkpoint import find_checkpoint, load_model
from configurator import fail
from hf_gpt2 import HF_CONV1D
from tokenizer import DATA_DIR, GPT2_EOT, DataError, eot_of, gpt2_encoding, need

# -----------------------------------------------------------------------------
# settings
out_dir = 'out'  # the folder holding train.py's ckpt.pt
hf_dir = 'out-hf'  # the Hugging Face folder to write
overwrite = False  # replace hf_dir if it holds an earlier export (a config.json)
# -----------------------------------------------------------------------------


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


# tokenizer.py's layout in Jinja, the language of transformers' chat templates: <|role|>content<|end|> per
# message, then <|assistant|> when a reply is to follow
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def add_chat_template(folder, tok, tk):
    """The chat template's markers as special tokens of folder's tokenizer.json, with the same ids (they follow
    every other id), and the template itself in tokenizer_config.json. Text between markers is encoded on its
    own, as tokenizer.py encodes each message's content."""
    path = os.path.join(folder, 'tokenizer.json')
    hf = tk.Tokenizer.from_file(path)
    hf.add_special_tokens([tk.AddedToken(name, special=True, normalized=False) for name in tok.special])
    wrong = {name: hf.token_to_id(name) for name, i in tok.special.items() if hf.token_to_id(name) != i}
    if wrong:
        raise ValueError(f"the chat markers got ids {wrong} in the exported tokenizer, not {tok.special}")
    hf.save(path)
    config_path = os.path.join(folder, 'tokenizer_config.json')
    with open(config_path, encoding='utf-8') as f:
        config = json.load(f)
    config.update(chat_template=CHAT_TEMPLATE, eos_token='<|end|>', added_tokens_decoder={
        str(i): dict(content=name, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for name, i in tok.special.items()})
    write_json(config_path, config)
    # generate() stops where chat.py does: at <|end|>, or a marker that would open another turn
    write_json(os.path.join(folder, 'generation_config.json'), dict(eos_token_id=sorted(tok.special_ids),
                                                                     pad_token_id=tok.special['<|end|>']))


def write_json(path, obj):
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=2)


def export():
    """Write the checkpoint out_dir/ckpt.pt as the Hugging Face folder hf_dir (the settings above)."""
    # the checkpoint and the data it was trained on
    try:
        ckpt_path = find_checkpoint(out_dir)
        model, tok, checkpoint = load_model(ckpt_path, 'cpu')  # with the tokenizer of the data it learned
        dataset = checkpoint['config']['dataset']
        safetensors = need('safetensors.torch', 'safetensors')
        tk = need('tokenizers', 'tokenizers') if tok.spec['type'] != 'char' else None  # for tokenizer.json
    except (ValueError, DataError) as e:
        fail(e)
    config = model.config
    switches = [k for k in ('rope', 'rmsnorm', 'swiglu', 'qk_norm') if getattr(config, k)] + \
        (['n_kv_head'] if config.n_kv_head not in (0, config.n_head) else [])
    if switches:
        fail(f"{ckpt_path} uses {', '.join(switches)}, which GPT-2's layout (GPT2LMHeadModel) does not have: only "
             f"models with every architecture switch off export to it")
    vocab_size, tokenizer = tok.n_vocab, tok.spec['type']  # the vocabulary's true size (train.py may pad it)
    # the end-of-text token, which config.json names bos and eos
    eot = GPT2_EOT if tokenizer == 'gpt2' else eot_of(tok.tok) if tokenizer == 'tokenizers' else None
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
        if not config.bias and k.startswith(('transformer.h.', 'transformer.ln_f.')) and k.endswith('.weight'):
            # a Linear's or LayerNorm's: GPT-2's layout has a bias beside it; zeros change nothing (exact)
            weights[k.removesuffix('weight') + 'bias'] = torch.zeros(v.size(0))  # (out features,)
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
            shutil.copy(os.path.join(DATA_DIR, dataset, tok.spec['file']), os.path.join(tmp, 'tokenizer.json'))
            write_json(os.path.join(tmp, 'tokenizer_config.json'), dict(tokenizer_class='PreTrainedTokenizerFast',
                       model_max_length=config.block_size, eos_token=None if eot is None else tok.tok.id_to_token(eot)))
            written = f"data/{dataset}'s tokenizer.json"
        else:
            written = (f"no tokenizer: a character vocabulary has no Hugging Face form; token i is character i of "
                       f"data/{dataset}/meta.json's \"chars\"")
        if tok.special and tokenizer != 'char':
            add_chat_template(tmp, tok, tk)
            written += ", the chat template's markers and chat_template"
        if os.path.exists(hf_dir):  # an earlier export (checked above), or an empty folder: moved aside, then gone
            os.replace(hf_dir, tmp + '.old')
        os.replace(tmp, hf_dir)
        shutil.rmtree(tmp + '.old', ignore_errors=True)
    except (OSError, ValueError) as e:
        fail(f"cannot write {hf_dir} ({getattr(e, 'strerror', None) or e})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a failure: what was written so far (renamed away on success)
    print(f"wrote {hf_dir}: a GPT-2 of {config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, "
          f"vocab {vocab_size:,}, context {config.block_size}; {written}")
    print(f"load it with: GPT2LMHeadModel.from_pretrained('{hf_dir}') (transformers), "
          f"or checkpoint.from_pretrained('{hf_dir}')")


if __name__ == '__main__':
    configurator.configure(globals())
    export()
