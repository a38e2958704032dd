"""
Writes a checkpoint of train.py as a Hugging Face folder, which transformers (and the tools built on
it) load as they load the models of the hub; with --gguf=FILE, also one GGUF file for llama.cpp
(and through it Ollama, LM Studio, llama.cpp's server):

    python export_hf.py --out_dir=out-shakespeare --hf_dir=hf-model
    python -c "import transformers as t; print(t.pipeline('text-generation', 'hf-model')('ROMEO:'))"
    python export_hf.py --out_dir=out-tinystories-modern --hf_dir=hf-tiny --gguf=tiny.gguf

The layout is the one the model's switches compute (hf_models.py): GPT-2's with every switch off,
Llama's with rope + rmsnorm + swiglu, Qwen3's with qk_norm too. The tokenizer goes with it, whatever
the data was prepared with: GPT-2's BPE (vocab.json, merges.txt, tokenizer.json), a tokenizer.json
(prepare.py's trained BPE, or a model's), or the characters of a character-level model (a
tokenizer.json that encodes one token per character). A chat model's markers become special tokens
and its template a chat_template, so that apply_chat_template(messages, add_generation_prompt=True)
gives the ids chat.py feeds, and generate stops where chat.py does (generation_config.json).
docs/export.md has every route and its commands.
"""

import json
import os
import shutil

import configurator
from checkpoint import find_checkpoint, load_model
from configurator import fail
from hf_models import to_hf
from tokenizer import DATA_DIR, GPT2_EOT, byte_to_unicode, eot_of, gpt2_encoding, need

# -----------------------------------------------------------------------------
# settings
out_dir = 'out'  # the folder holding train.py's ckpt.pt
hf_dir = 'out-hf'  # the Hugging Face folder to write
gguf = ''  # also write this GGUF file for llama.cpp ('' = none; pip install gguf)
overwrite = False  # replace hf_dir (and the GGUF file) if they hold an earlier export
# -----------------------------------------------------------------------------


def gpt2_vocab_and_merges():
    """vocab.json's {token: id} and merges.txt's pairs, from tiktoken's ranks. A token's rank is its
    id and its merge's priority; BPE made it from two older tokens, which we find by re-running BPE
    on its bytes until two pieces are left (merges.txt in rank order then encodes as tiktoken)."""
    enc = gpt2_encoding()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i != GPT2_EOT}
    spell = byte_to_unicode()
    word = lambda token: ''.join(spell[b] for b in token)  # noqa: E731
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
    """GPT-2's BPE as vocab.json, merges.txt (the slow GPT2Tokenizer's) and tokenizer.json."""
    vocab, merges = gpt2_vocab_and_merges()
    with open(os.path.join(folder, 'vocab.json'), 'w', encoding='utf-8') as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, 'merges.txt'), 'w', encoding='utf-8') as f:
        f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
    tokens = dict(bos_token='<|endoftext|>', eos_token='<|endoftext|>', unk_token='<|endoftext|>')
    write_json(os.path.join(folder, 'tokenizer_config.json'), dict(
        tokenizer_class='GPT2Tokenizer', model_max_length=block_size, add_prefix_space=False,
        **tokens))
    # tokenizer.json: the same BPE for the tokenizers library, which fast tokenizers use
    tok = tk.Tokenizer(tk.models.BPE(vocab, merges))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split
    tok.decoder = tk.decoders.ByteLevel()
    tok.add_special_tokens([tk.AddedToken('<|endoftext|>', special=True)])
    tok.save(os.path.join(folder, 'tokenizer.json'))


def write_char_tokenizer(folder, chars, block_size, tk):
    """A character vocabulary as a tokenizer.json: each character of the text (newlines and spaces
    too) is a token of its own (a Split pre-tokenizer isolating every character), looked up in
    WordLevel's table of ids; decoding joins the tokens with nothing between them (Fuse)."""
    tok = tk.Tokenizer(tk.models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    tok.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r'[\s\S]'), behavior='isolated')
    tok.decoder = tk.decoders.Fuse()
    tok.save(os.path.join(folder, 'tokenizer.json'))
    write_json(os.path.join(folder, 'tokenizer_config.json'), dict(
        tokenizer_class='PreTrainedTokenizerFast', model_max_length=block_size,
        clean_up_tokenization_spaces=False))


# tokenizer.py's layout in Jinja, the language of transformers' chat templates:
# <|role|>content<|end|>
# per message, then <|assistant|> when a reply is to follow
CHAT_TEMPLATE = ("{% for message in messages %}"
                 "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
                 "{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def add_chat_template(folder, tok, tk):
    """The chat template's markers as special tokens of folder's tokenizer.json, with the same ids
    (they follow every other id), and the template itself in tokenizer_config.json. Text between
    markers is encoded on its own, as tokenizer.py encodes each message's content."""
    path = os.path.join(folder, 'tokenizer.json')
    hf = tk.Tokenizer.from_file(path)
    hf.add_special_tokens([tk.AddedToken(name, special=True, normalized=False)
                           for name in tok.special])
    wrong = {name: hf.token_to_id(name) for name, i in tok.special.items()
             if hf.token_to_id(name) != i}
    if wrong:
        raise ValueError(f"the chat markers got ids {wrong} in the exported tokenizer, "
                         f"not {tok.special}")
    hf.save(path)
    config_path = os.path.join(folder, 'tokenizer_config.json')
    with open(config_path, encoding='utf-8') as f:
        config = json.load(f)
    config.update(chat_template=CHAT_TEMPLATE, eos_token='<|end|>', added_tokens_decoder={
        str(i): dict(content=name, special=True, normalized=False, lstrip=False, rstrip=False,
                     single_word=False) for name, i in tok.special.items()})
    write_json(config_path, config)
    # generate() stops where chat.py does: at <|end|>, or a marker that would open another turn
    write_json(os.path.join(folder, 'generation_config.json'), dict(
        eos_token_id=sorted(tok.special_ids), pad_token_id=tok.special['<|end|>']))


def write_json(path, obj):
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def write_tokenizer(folder, tok, data_dir, block_size, tk):
    """The tokenizer of the data the model learned, in folder; returns what it wrote, in words."""
    kind = tok.spec['type']
    if kind == 'gpt2':
        write_gpt2_tokenizer(folder, block_size, tk)
        written = "GPT-2's tokenizer (vocab.json, merges.txt, tokenizer.json)"
    elif kind == 'tokenizers':
        source = os.path.join(data_dir, tok.spec['file'])
        shutil.copy(source, os.path.join(folder, 'tokenizer.json'))
        eot = eot_of(tok.tok)
        write_json(os.path.join(folder, 'tokenizer_config.json'), dict(
            tokenizer_class='PreTrainedTokenizerFast', model_max_length=block_size,
            clean_up_tokenization_spaces=False,
            eos_token=None if eot is None else tok.tok.id_to_token(eot)))
        written = f"{data_dir}'s tokenizer.json"
    else:
        write_char_tokenizer(folder, tok.chars, block_size, tk)
        written = f"its {len(tok.chars)} characters as a tokenizer.json"
    if tok.special:
        add_chat_template(folder, tok, tk)
        written += ", the chat template's markers and chat_template"
    elif tok.template:  # a model's own template (conversations.py), as its folder had it
        path = os.path.join(folder, 'tokenizer_config.json')
        with open(path, encoding='utf-8') as f:
            config = json.load(f)
        write_json(path, dict(config, chat_template=tok.template, **tok.chat['named']))
        write_json(os.path.join(folder, 'generation_config.json'),
                   dict(eos_token_id=tok.chat['stop']))
        written += ", the model's own chat_template"
    return written


def export():
    """Write the checkpoint out_dir/ckpt.pt as the Hugging Face folder hf_dir (and gguf)."""
    try:
        ckpt_path = find_checkpoint(out_dir)
        model, tok, checkpoint = load_model(ckpt_path, 'cpu')  # with the tokenizer it learned
        data_dir = os.path.join(DATA_DIR, checkpoint['config']['dataset'])
        safetensors = need('safetensors.torch', 'safetensors')
        tk = need('tokenizers', 'tokenizers')
    except ValueError as e:
        fail(e)
    if gguf and tok.spec['type'] == 'char':
        fail(f"{ckpt_path} reads characters, which llama.cpp's tokenizers (byte-level BPE, "
             f"SentencePiece) cannot express: export without --gguf and use the folder with "
             f"transformers (AutoTokenizer, pipeline)")
    try:  # the weights in transformers' names and shapes, the vocabulary's true size (not padded)
        kind = tok.spec['type']  # the end-of-text token, which config.json names bos and eos
        eot = GPT2_EOT if kind == 'gpt2' else eot_of(tok.tok) if kind == 'tokenizers' else None
        hf_config, weights = to_hf(model, tok.n_vocab, eot)
    except ValueError as e:  # a combination of switches no standard layout computes
        fail(f"{ckpt_path}: {e}")
    for path, what in ((hf_dir, 'config.json'), (gguf, None)):
        exists = path and (os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)))
        earlier = path and (os.path.isfile(os.path.join(path, 'config.json')) if what else
                            os.path.isfile(path))
        if exists and not (overwrite and earlier):
            fail(f"{path} already exists: choose another path, or pass --overwrite=True to replace "
                 f"an earlier export")

    # write everything into hf_dir.tmp, then rename it: an error or Ctrl-C leaves no half folder
    tmp = hf_dir.rstrip('/') + '.tmp'
    try:
        for leftover in (tmp, tmp + '.old'):  # of an earlier export that was interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        os.makedirs(tmp)
        safetensors.torch.save_file(weights, os.path.join(tmp, 'model.safetensors'),
                                    metadata={'format': 'pt'})
        write_json(os.path.join(tmp, 'config.json'), hf_config)
        written = write_tokenizer(tmp, tok, data_dir, model.config.block_size, tk)
        if gguf:
            from gguf_export import write_gguf
            gguf_summary = write_gguf(tmp, gguf)
        if os.path.exists(hf_dir):  # an earlier export (checked above): moved aside, then gone
            os.replace(hf_dir, tmp + '.old')
        os.replace(tmp, hf_dir)
        shutil.rmtree(tmp + '.old', ignore_errors=True)
    except ImportError as e:
        fail(e)
    except (OSError, ValueError) as e:  # (gguf_export speaks of the folder by its final name)
        why = (getattr(e, 'strerror', None) or str(e)).replace(tmp, hf_dir.rstrip('/'))
        fail(f"cannot write {gguf if gguf and isinstance(e, ValueError) else hf_dir} ({why})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a failure: what was written so far
    layout = hf_config['architectures'][0]
    print(f"wrote {hf_dir}: a {layout} of {model.config.n_layer} layers, {model.config.n_head} "
          f"heads, {model.config.n_embd} wide, vocab {tok.n_vocab:,}, context "
          f"{model.config.block_size}; {written}")
    if gguf:
        print(f"{gguf_summary}; run it with llama.cpp: llama-cli -m {gguf}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained('{hf_dir}') (transformers), or "
          f"python sample.py --init_from={hf_dir}")


if __name__ == '__main__':
    configurator.configure(globals())
    export()
