"""
Writes a Hugging Face model folder (transformers' save_pretrained, with a byte-level BPE
tokenizer.json and tokenizer_config.json) as one GGUF file, the format llama.cpp and the tools
built on it load:

    from gguf_export import write_gguf
    print(write_gguf('hf-model', 'model.gguf'))
    # then: llama-cli -m model.gguf -p 'ROMEO:', or llama_cpp.Llama(model_path='model.gguf')

Three layouts, in float32: LlamaForCausalLM, Qwen3ForCausalLM and GPT2LMHeadModel. llama.cpp
re-implements each pre-tokenizer (the split of text into words before BPE) under a name, so the
name is read off tokenizer.json's own pre-tokenizer, and a split llama.cpp has no name for is
refused. Key and tensor names come from the gguf package (llama.cpp's gguf-py); facts about what
llama.cpp reads come from its sources (convert_hf_to_gguf.py's conversion/*.py, src/*.cpp), cited
where used.
"""

import json
import os

ARCHS = {'LlamaForCausalLM': 'llama', 'Qwen3ForCausalLM': 'qwen3', 'GPT2LMHeadModel': 'gpt2'}

# tokenizer.json split regexes as llama-vocab.cpp quotes them ("original regex from tokenizer.json")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_SPLIT = 'ByteLevel(add_prefix_space=False, use_regex=True)'  # GPT-2's regex, then bytes
BYTES = 'ByteLevel(add_prefix_space=False, use_regex=False)'  # bytes to characters, no split
# a pre-tokenizer, as describe() spells it -> llama.cpp's name for the same split, and whether
# llama.cpp then takes a word found whole in the vocabulary as it is (ignore_merges):
# llama-vocab.cpp (the names that select each pre type, llm_tokenizer_bpe's regexes per type)
KNOWN_SPLITS = {
    GPT2_SPLIT: ('gpt-2', False),
    f'Split({QWEN2_PATTERN!r}, Isolated), {BYTES}': ('qwen2', False),  # Qwen2, Qwen2.5, Qwen3
    f'Split({LLAMA3_PATTERN!r}, Isolated), {BYTES}': ('llama3', True),  # Llama 3
    f'Digits(individual_digits=True), {GPT2_SPLIT}': ('smollm', False),  # SmolLM, StarCoder
}


def write_gguf(hf_dir, path):
    """Write the model in the Hugging Face folder hf_dir as the GGUF file path (a temporary file
    renamed into place: nothing half-written on error); returns a one-line summary."""
    try:
        import gguf
    except ImportError:
        raise ImportError("gguf_export needs llama.cpp's GGUF writer: pip install gguf") from None
    cfg = read_json(hf_dir, 'config.json', required=True)
    arch = check_config(cfg, hf_dir)
    tok = read_tokenizer(hf_dir, cfg['vocab_size'], gguf)  # before the weights: refusals come early
    weights = read_weights(hf_dir)
    tensors = gpt2_tensors(cfg, weights) if arch == 'gpt2' else \
        llama_tensors(cfg, weights, permute=arch == 'llama')
    model_arch = gguf.MODEL_ARCH[arch.upper()]
    tensor_map = gguf.get_tensor_name_map(model_arch, n_layers(cfg))
    tmp = f'{path}.tmp'
    try:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[model_arch])
        w.add_name(os.path.basename(os.path.abspath(hf_dir)))
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        write_hparams(w, cfg, arch)
        write_tokenizer(w, tok)
        for name, t in tensors:
            gguf_name = tensor_map.get_name(name, try_suffixes=('.weight', '.bias'))
            if gguf_name is None:
                raise ValueError(f"{hf_dir}: tensor {name} has no place in llama.cpp's {arch}: "
                                 f"only a plain {cfg['architectures'][0]} converts here")
            w.add_tensor(gguf_name, t.float().contiguous().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    heads = cfg.get('num_attention_heads') or cfg['n_head']
    return (f"wrote {path}: {cfg['architectures'][0]} as llama.cpp's {arch}, {n_layers(cfg)} "
            f"layers, {heads} heads, vocab {cfg['vocab_size']:,}, pre-tokenizer {tok['pre']}, "
            f"{os.path.getsize(path) / 2**20:.1f} MiB float32")


def read_json(hf_dir, name, required=False):
    file = os.path.join(hf_dir, name)
    if not os.path.isfile(file):
        if required:
            raise ValueError(f"{file} is missing: write the folder with save_pretrained")
        return {}
    with open(file, encoding='utf-8') as f:
        return json.load(f)


# the model


def n_layers(cfg):
    return cfg.get('num_hidden_layers') or cfg['n_layer']


def check_config(cfg, hf_dir):
    """llama.cpp's name for the architecture; a ValueError for what it would compute otherwise."""
    file = os.path.join(hf_dir, 'config.json')
    name = (cfg.get('architectures') or ['none'])[0]
    if name not in ARCHS:
        raise ValueError(f"{file}: architecture {name} is not one gguf_export writes "
                         f"({', '.join(ARCHS)}): convert it with llama.cpp's convert_hf_to_gguf.py")
    arch, rope, refuse = ARCHS[name], cfg.get('rope_parameters') or {}, []
    if cfg.get('rope_scaling') or rope.get('rope_type', 'default') != 'default' or \
            set(rope) - {'rope_type', 'rope_theta'}:
        refuse.append(f"RoPE scaling ({cfg.get('rope_scaling') or rope})")
    if cfg.get('use_sliding_window') or 'sliding_attention' in (cfg.get('layer_types') or []):
        refuse.append('sliding-window attention')
    if arch == 'gpt2':
        if cfg.get('activation_function') not in ('gelu', 'gelu_new', 'gelu_pytorch_tanh'):
            refuse.append(f"activation {cfg.get('activation_function')}")
        if not cfg.get('scale_attn_weights', True) or cfg.get('scale_attn_by_inverse_layer_idx'):
            refuse.append('attention scores not scaled by 1/sqrt(head size)')  # src/models/gpt2.cpp
        if cfg.get('add_cross_attention'):
            refuse.append('cross-attention')
    elif cfg.get('hidden_act', 'silu') != 'silu':
        refuse.append(f"activation {cfg['hidden_act']}")
    elif arch == 'qwen3' and cfg.get('attention_bias'):
        # src/models/qwen3.cpp loads q/k/v biases but not the output projection's, which Qwen3 has
        refuse.append("attention biases (llama.cpp's qwen3 has no output-projection bias)")
    if refuse:
        raise ValueError(f"{file}: {name} with {', '.join(refuse)}, which llama.cpp's {arch} does "
                         f"not compute: use the folder with transformers, or a model without it")
    return arch


def read_weights(hf_dir):
    """{name: tensor} of the folder's model.safetensors (or its shards). Not hf_models.read_files:
    this module imports nothing of the project, so it converts any folder on its own."""
    from safetensors.torch import load_file
    index = read_json(hf_dir, 'model.safetensors.index.json')
    files = sorted(set(index['weight_map'].values())) if index else ['model.safetensors']
    if not os.path.isfile(os.path.join(hf_dir, files[0])):
        raise ValueError(f"{hf_dir} has no {files[0]}: save the model with save_pretrained "
                         f"(safetensors, its default)")
    weights = {}
    for file in files:
        weights.update(load_file(os.path.join(hf_dir, file)))
    return weights


def llama_tensors(cfg, weights, permute):
    """(HF name, tensor) for llama.cpp's llama (permute=True) and qwen3."""
    heads = cfg['num_attention_heads']
    kv_heads = cfg.get('num_key_value_heads') or heads
    head_dim = cfg.get('head_dim') or cfg['hidden_size'] // heads
    for name, t in weights.items():
        if name == 'lm_head.weight' and cfg.get('tie_word_embeddings', False):
            continue  # no output.weight: llama.cpp's output is token_embd (src/models/llama.cpp)
        if permute and name.split('.')[-2] in ('q_proj', 'k_proj'):  # weights and biases
            # llama.cpp's llama rotates adjacent pairs (rope type NORM: llama-model.cpp's
            # llama_model_rope_type), HF's Llama a head's first half against its second
            # (rotate_half): each head's rows in the order 0, d/2, 1, d/2 + 1, ..., as
            # conversion/llama.py's LlamaModel.permute does. qwen3 rotates halves (NEOX) as HF does.
            n = heads if 'q_proj' in name else kv_heads
            t = t.reshape(n, 2, head_dim // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
        yield name, t


def gpt2_tensors(cfg, weights):
    """(HF name, tensor) for llama.cpp's gpt2."""
    for name, t in weights.items():
        if name.endswith(('.attn.bias', '.attn.masked_bias')):
            continue  # the causal masks older transformers saved
        if name == 'lm_head.weight' and cfg.get('tie_word_embeddings', True):
            continue  # no output.weight: llama.cpp's output is token_embd (src/models/gpt2.cpp)
        if name.endswith(('c_attn.weight', 'c_proj.weight', 'c_fc.weight')):
            t = t.t()  # HF's Conv1D holds (in, out), llama.cpp (out, in): conversion/gpt2.py
        yield name, t


def write_hparams(w, cfg, arch):
    """The keys llama.cpp reads for arch (llama-model.cpp's load_hparams, src/models/<arch>.cpp)."""
    if arch == 'gpt2':
        # src/models/gpt2.cpp: learned positions (n_ctx_train rows), LayerNorm, and between c_fc and
        # c_proj ggml_gelu, which on the CPU is the tanh form looked up in a float16 table at the
        # input rounded to float16 (ggml-cpu/vec.h: GGML_GELU_FP16, ggml_vec_gelu_f32), for 'gelu'
        # (exact, erf) and 'gelu_new' (tanh) alike: test_gguf.py measures what it moves
        w.add_context_length(cfg['n_positions'])
        w.add_embedding_length(cfg['n_embd'])
        w.add_block_count(cfg['n_layer'])
        w.add_feed_forward_length(cfg.get('n_inner') or 4 * cfg['n_embd'])
        w.add_head_count(cfg['n_head'])
        w.add_layer_norm_eps(cfg.get('layer_norm_epsilon', 1e-5))
    else:
        heads = cfg['num_attention_heads']
        head_dim = cfg.get('head_dim') or cfg['hidden_size'] // heads
        rope = cfg.get('rope_parameters') or {}
        w.add_context_length(cfg['max_position_embeddings'])
        w.add_embedding_length(cfg['hidden_size'])
        w.add_block_count(cfg['num_hidden_layers'])
        w.add_feed_forward_length(cfg['intermediate_size'])
        w.add_head_count(heads)
        w.add_head_count_kv(cfg.get('num_key_value_heads') or heads)
        # the head size, which llama.cpp otherwise takes as hidden / heads (llama-model.cpp); llama
        # and qwen3 rotate whole heads (src/models/llama.cpp, qwen3.cpp assert n_rot == head size)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(rope.get('rope_theta', cfg.get('rope_theta', 10000.0)))
        w.add_layer_norm_rms_eps(cfg.get('rms_norm_eps', 1e-6))  # qwen3's q_norm/k_norm's too
    w.add_vocab_size(cfg['vocab_size'])


# the tokenizer


def describe(step):
    """One step of a tokenizer.json pre-tokenizer, spelled as in KNOWN_SPLITS."""
    kind = step.get('type')
    if kind == 'ByteLevel':
        return (f"ByteLevel(add_prefix_space={step.get('add_prefix_space', True)}, "
                f"use_regex={step.get('use_regex', True)})")
    if kind == 'Split':
        pattern = step.get('pattern', {})
        return (f"Split({pattern.get('Regex', pattern)!r}, {step.get('behavior')}"
                f"{', inverted' if step.get('invert') else ''})")
    if kind == 'Digits':
        return f"Digits(individual_digits={step.get('individual_digits')})"
    return str(kind)


def read_tokenizer(hf_dir, vocab_size, gguf):
    """What write_tokenizer writes, from tokenizer.json, tokenizer_config.json,
    generation_config.json and config.json; a ValueError for what llama.cpp cannot reproduce."""
    file = os.path.join(hf_dir, 'tokenizer.json')
    tj = read_json(hf_dir, 'tokenizer.json')
    if not tj:
        raise ValueError(f"{file} is missing: save the tokenizer beside the model "
                         f"(save_pretrained)")
    model, pre = tj.get('model') or {}, tj.get('pre_tokenizer') or {}
    steps = pre.get('pretokenizers', []) if pre.get('type') == 'Sequence' else [pre] if pre else []
    if not (model.get('type') == 'BPE' and (tj.get('decoder') or {}).get('type') == 'ByteLevel'
            and steps and steps[-1].get('type') == 'ByteLevel' and not model.get('byte_fallback')
            and not model.get('continuing_subword_prefix') and not model.get('end_of_word_suffix')):
        raise ValueError(f"{file}: a {model.get('type')} tokenizer, not byte-level BPE, which "
                         f"llama.cpp's tokenizers cannot express: use the folder itself with "
                         f"transformers (AutoTokenizer, AutoModelForCausalLM)")
    split = ', '.join(describe(step) for step in steps)
    if split not in KNOWN_SPLITS:
        raise ValueError(f"{file}: pre-tokenizer {split} is no split llama.cpp implements (it "
                         f"knows GPT-2's ByteLevel, Qwen2's, Llama 3's, SmolLM's): train the "
                         f"tokenizer with one of them, or use the folder with transformers")
    pre_name, ignore_merges = KNOWN_SPLITS[split]
    if bool(model.get('ignore_merges')) != ignore_merges:
        raise ValueError(f"{file}: ignore_merges is {bool(model.get('ignore_merges'))}, "
                         f"llama.cpp's '{pre_name}' has {ignore_merges}: use the folder with "
                         f"transformers")
    if (tj.get('normalizer') or {}).get('type', 'NFC') != 'NFC':  # NFC leaves NFC text as it is
        raise ValueError(f"{file}: normalizer {tj['normalizer']['type']}, which llama.cpp's BPE "
                         f"does not apply: use the folder with transformers")

    # tokens in id order: the BPE's, then the added ones (which llama.cpp finds in text first),
    # typed as conversion/base.py's get_vocab_base types them; ids no token has are UNUSED
    texts = {i: text for text, i in model['vocab'].items()}
    types = dict.fromkeys(texts, gguf.TokenType.NORMAL)
    for added in tj.get('added_tokens', []):
        texts[added['id']] = added['content']
        types[added['id']] = gguf.TokenType.CONTROL if added['special'] else \
            gguf.TokenType.USER_DEFINED
    if max(texts) >= vocab_size:
        raise ValueError(f"{file} has ids up to {max(texts)}, config.json's vocab_size is "
                         f"{vocab_size}: resize the model's embeddings to the tokenizer")
    tok = dict(pre=pre_name, tokens=[texts.get(i, f'[PAD{i}]') for i in range(vocab_size)],
               types=[types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)],
               merges=[m if isinstance(m, str) else ' '.join(m) for m in model.get('merges', [])])

    # special ids: tokenizer_config.json's tokens, else generation_config.json's, config.json's ids
    ids = {text: i for i, text in texts.items()}
    sources = [read_json(hf_dir, name) for name in
               ('tokenizer_config.json', 'generation_config.json', 'config.json')]
    for kind in ('bos', 'eos', 'unk', 'pad'):
        named = sources[0].get(f'{kind}_token')
        found = [ids.get(named.get('content') if isinstance(named, dict) else named)]
        found += [source.get(f'{kind}_token_id') for source in sources[1:]]
        found = [i[0] if isinstance(i, list) and i else i for i in found]  # eos lists: the first
        tok[kind] = next((i for i in found if isinstance(i, int) and 0 <= i < vocab_size), None)
    # a bos (eos) added where the post-processor's template starts (ends) with a special token
    post = tj.get('post_processor') or {}
    tok['add_bos'] = tok['add_eos'] = False
    for step in post.get('processors', []) if post.get('type') == 'Sequence' else [post]:
        if step.get('type') == 'TemplateProcessing' and step.get('single'):
            tok['add_bos'] = 'SpecialToken' in step['single'][0]
            tok['add_eos'] = 'SpecialToken' in step['single'][-1]
    tok['chat_template'] = sources[0].get('chat_template')
    jinja = os.path.join(hf_dir, 'chat_template.jinja')  # where newer transformers save it
    if tok['chat_template'] is None and os.path.isfile(jinja):
        with open(jinja, encoding='utf-8') as f:
            tok['chat_template'] = f.read()
    return tok


def write_tokenizer(w, tok):
    """The keys llama-vocab.cpp reads for a byte-level BPE vocabulary (its 'gpt2' model)."""
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre(tok['pre'])
    w.add_token_list(tok['tokens'])
    w.add_token_types(tok['types'])
    w.add_token_merges(tok['merges'])
    for kind in ('bos', 'eos', 'unk', 'pad'):
        if tok[kind] is not None:
            getattr(w, f'add_{kind}_token_id')(tok[kind])
    # written always: without them llama-vocab.cpp assumes a bos for some pre types ('llama3')
    w.add_add_bos_token(tok['add_bos'])
    w.add_add_eos_token(tok['add_eos'])
    if tok['chat_template']:
        w.add_chat_template(tok['chat_template'])
