"""
Hugging Face model folders, read and written: the one mapping between model.py's names and
transformers' for the three layouts that model.py's switches compute exactly.

    layout (architectures)   model.py's switches                      weights in the folder
    GPT2LMHeadModel          every switch off (GPT-2)                 the same names, but c_attn,
                                                                       c_proj, c_fc transposed
    LlamaForCausalLM         rope, rmsnorm, swiglu; any n_kv_head,    q/k/v_proj split from c_attn,
                             bias on or off, untied lm_head           gate/up_proj from c_fc
    Qwen3ForCausalLM         Llama's, with qk_norm (no MLP biases)    Llama's and q_norm, k_norm

    from hf_models import from_pretrained, to_hf
    model = from_pretrained('gpt2')                  # the hub's 124M (downloads.py), or a folder
    config, weights = to_hf(model, vocab_size)       # config.json's dict, the safetensors' tensors

checkpoint.load_model reads folders with from_pretrained (with their tokenizer: hf_tokenizer_of);
export_hf.py writes them with to_hf. Nothing here runs code from a folder: weights come from
safetensors, or from pytorch_model.bin read with weights_only=True.
"""

import glob
import json
import os

import torch

from downloads import download_model
from model import GPT, GPTConfig
from conversations import model_template
from tokenizer import Tokenizer, eot_of

# GPT-2's files store these transposed, (in, out): OpenAI's code multiplied by them as a "Conv1D"
HF_CONV1D = ('c_attn.weight', 'c_proj.weight', 'c_fc.weight')
HF_GELU = {'gelu_new': 'tanh', 'gelu_pytorch_tanh': 'tanh', 'gelu': 'exact'}  # -> GPTConfig.gelu
LLAMA_FAMILY = {'llama': 'LlamaForCausalLM', 'qwen3': 'Qwen3ForCausalLM'}
# the names of one Llama block, ours -> theirs (c_attn and c_fc are split: llama_block_names)
LLAMA_BLOCK = {
    'ln_1.weight': 'input_layernorm.weight',
    'ln_2.weight': 'post_attention_layernorm.weight',
    'attn.c_proj.weight': 'self_attn.o_proj.weight',
    'attn.c_proj.bias': 'self_attn.o_proj.bias',
    'attn.q_norm.weight': 'self_attn.q_norm.weight',
    'attn.k_norm.weight': 'self_attn.k_norm.weight',
    'mlp.c_proj.weight': 'mlp.down_proj.weight',
    'mlp.c_proj.bias': 'mlp.down_proj.bias',
}


# -----------------------------------------------------------------------------
# config.json <-> GPTConfig


def read_config(folder):
    """GPTConfig's arguments for the model of a folder's config.json; a ValueError naming the field
    for what model.py does not compute (rather than load a model that gives other logits)."""
    path = os.path.join(folder, 'config.json')
    try:
        with open(path, encoding='utf-8') as f:
            hf = json.load(f)
        kind = hf.get('model_type')
        args = gpt2_args(hf) if kind == 'gpt2' else llama_args(hf) if kind in LLAMA_FAMILY else None
    except (OSError, ValueError, KeyError, TypeError) as e:  # no file, not JSON, a key missing
        raise ValueError(f"{path} is not a model's config.json ({type(e).__name__}: {e})") from None
    if args is None:
        raise ValueError(f"{path}: model_type {kind!r} is not one this GPT computes: 'gpt2', "
                         f"'llama' or 'qwen3' (GPT-2, Llama, SmolLM2, TinyLlama, Qwen3)")
    unsupported = args.pop('unsupported')
    if unsupported:
        raise ValueError(f"{path}: this GPT does not compute {', '.join(unsupported)}")
    return args


def gpt2_args(hf):
    args = dict(n_layer=hf['n_layer'], n_head=hf['n_head'], n_embd=hf['n_embd'],
                block_size=hf['n_positions'], vocab_size=hf['vocab_size'], bias=True,
                gelu=HF_GELU.get(hf.get('activation_function', 'gelu_new')),
                mlp_hidden=hf.get('n_inner') or 0, norm_eps=hf.get('layer_norm_epsilon', 1e-5),
                tie_embeddings=hf.get('tie_word_embeddings', True))
    args['unsupported'] = [f"{k}={hf.get(k)!r}" for k, ok in [
        ('activation_function', args['gelu'] is not None),
        ('scale_attn_weights', hf.get('scale_attn_weights', True)),
        ('scale_attn_by_inverse_layer_idx', not hf.get('scale_attn_by_inverse_layer_idx', False)),
        ('reorder_and_upcast_attn', not hf.get('reorder_and_upcast_attn', False)),
    ] if not ok]
    return args


def llama_args(hf):
    rope = hf.get('rope_parameters') or {}  # transformers 5 keeps rope_theta in here
    theta = hf.get('rope_theta', rope.get('rope_theta', 10000.0))
    heads, width = hf['num_attention_heads'], hf['hidden_size']
    head_dim = hf.get('head_dim') or width // heads
    bias = hf.get('attention_bias', False)
    args = dict(n_layer=hf['num_hidden_layers'], n_head=heads, n_embd=width,
                block_size=hf.get('max_position_embeddings', 2048), vocab_size=hf['vocab_size'],
                bias=bias, rope=True, rmsnorm=True, swiglu=True,
                qk_norm=hf['model_type'] == 'qwen3',
                n_kv_head=hf.get('num_key_value_heads') or heads,
                head_dim=head_dim if head_dim != width // heads else 0,
                mlp_hidden=hf['intermediate_size'], rope_theta=float(theta),
                norm_eps=hf.get('rms_norm_eps', 1e-6),
                tie_embeddings=hf.get('tie_word_embeddings', False))
    if args['n_kv_head'] == heads:
        args['n_kv_head'] = 0
    scaled = rope.get('rope_type', 'default') != 'default'
    scaling = hf.get('rope_scaling') or (rope if scaled else None)
    mlp_bias = hf.get('mlp_bias', False) if hf['model_type'] == 'llama' else False
    layer_types = set(hf.get('layer_types') or ['full_attention'])
    args['unsupported'] = [f"{k}={v!r}" for k, v, ok in [
        ('rope_scaling', scaling, scaling is None),
        ('hidden_act', hf.get('hidden_act'), hf.get('hidden_act', 'silu') == 'silu'),
        ('mlp_bias', mlp_bias, mlp_bias == bias),  # model.py's bias is on every Linear or none
        ('use_sliding_window', hf.get('use_sliding_window'), not hf.get('use_sliding_window')),
        ('layer_types', sorted(layer_types), layer_types == {'full_attention'}),
        ('rope_interleaved', hf.get('rope_interleaved'), not hf.get('rope_interleaved')),
    ] if not ok]
    return args


def layout_of(config):
    """'gpt2', 'llama' or 'qwen3': the layout a GPTConfig's switches compute; a ValueError naming
    the switches when no standard layout computes that combination."""
    switches = {k: getattr(config, k) for k in ('rope', 'rmsnorm', 'swiglu', 'qk_norm')}
    gqa = config.n_kv_head not in (0, config.n_head)
    head_dim = config.head_size != config.n_embd // config.n_head
    if not any(switches.values()) and not gqa and not head_dim:
        return 'gpt2'
    if switches['rope'] and switches['rmsnorm'] and switches['swiglu']:
        if config.qk_norm and config.bias:
            raise ValueError("qk_norm with bias=True: Qwen3's layout has no MLP biases; export a "
                             "model trained with bias=False")
        return 'qwen3' if config.qk_norm else 'llama'
    on = [k for k, v in switches.items() if v] + (['n_kv_head'] if gqa else []) + \
        (['head_dim'] if head_dim else [])
    raise ValueError(f"the model uses {', '.join(on) or 'no switch'}, a combination no standard "
                     f"layout computes: GPT-2's has every switch off, Llama's rope + rmsnorm + "
                     f"swiglu (any n_kv_head, head_dim, bias), Qwen3's those and qk_norm")


def hf_config(config, vocab_size, layout, eot=None):
    """config.json's dict for a GPTConfig in layout (layout_of), for vocab_size tokens."""
    common = dict(vocab_size=vocab_size, bos_token_id=eot, eos_token_id=eot, use_cache=True,
                  tie_word_embeddings=config.tie_embeddings, initializer_range=0.02,
                  dtype='float32')
    if layout == 'gpt2':
        return dict(architectures=['GPT2LMHeadModel'], model_type='gpt2',
                    n_positions=config.block_size, n_ctx=config.block_size, n_embd=config.n_embd,
                    n_layer=config.n_layer, n_head=config.n_head, n_inner=config.mlp_hidden or None,
                    # transformers' 'gelu' is exact; 'gelu_new' the tanh form of GPT-2's weights
                    activation_function='gelu_new' if config.gelu == 'tanh' else 'gelu',
                    resid_pdrop=config.dropout, embd_pdrop=config.dropout,
                    attn_pdrop=config.dropout, layer_norm_epsilon=config.norm_eps,
                    scale_attn_weights=True, **common)
    return dict(architectures=[LLAMA_FAMILY[layout]], model_type=layout,
                hidden_size=config.n_embd, intermediate_size=config.hidden_size,
                num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                num_key_value_heads=config.n_kv_head or config.n_head,
                head_dim=config.head_size, hidden_act='silu',
                max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
                # both spellings: transformers 4 reads rope_theta, 5 rope_parameters
                rope_theta=config.rope_theta,
                rope_parameters=dict(rope_type='default', rope_theta=config.rope_theta),
                attention_bias=config.bias, attention_dropout=config.dropout,
                **(dict(mlp_bias=config.bias) if layout == 'llama' else {}), **common)


# -----------------------------------------------------------------------------
# the weights: transformers' names <-> model.py's


def llama_block_names(config, i):
    """(ours, theirs) for block i of a Llama/Qwen3 model, except c_attn and c_fc (split)."""
    return [(f'transformer.h.{i}.{ours}', f'model.layers.{i}.{theirs}')
            for ours, theirs in LLAMA_BLOCK.items()]


def to_hf(model, vocab_size, eot=None):
    """(config.json's dict, {name: tensor} in transformers' names and shapes) of model, its
    vocabulary cut to vocab_size (train.py pads it: the padding rows are never used)."""
    config = model.config
    layout = layout_of(config)
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    ours['transformer.wte.weight'] = ours['transformer.wte.weight'][:vocab_size]
    ours['lm_head.weight'] = ours['lm_head.weight'][:vocab_size]
    if config.tie_embeddings:
        del ours['lm_head.weight']  # the same tensor as wte: transformers ties them on loading
    weights = {}
    if layout == 'gpt2':
        for k, v in ours.items():
            weights[k] = v.t() if k.endswith(HF_CONV1D) else v  # Conv1D: (in, out)
            if not config.bias and k.startswith(('transformer.h.', 'transformer.ln_f.')) \
                    and k.endswith('.weight'):
                # GPT-2's layout has a bias beside each weight; zeros change nothing (exact)
                weights[k.removesuffix('weight') + 'bias'] = torch.zeros(v.size(0))  # (out,)
    else:
        nh, nkv, hs, hidden = config.n_head, config.n_kv_head or config.n_head, config.head_size, \
            config.hidden_size
        for i in range(config.n_layer):
            p = f'transformer.h.{i}.'
            for part in ('weight', 'bias') if config.bias else ('weight',):
                q, k, v = ours.pop(p + f'attn.c_attn.{part}').split([nh * hs, nkv * hs, nkv * hs])
                gate, up = ours.pop(p + f'mlp.c_fc.{part}').split([hidden, hidden])
                for name, t in (('self_attn.q_proj', q), ('self_attn.k_proj', k),
                                ('self_attn.v_proj', v), ('mlp.gate_proj', gate),
                                ('mlp.up_proj', up)):
                    weights[f'model.layers.{i}.{name}.{part}'] = t
            for mine, theirs in llama_block_names(config, i):
                if mine in ours:
                    weights[theirs] = ours.pop(mine)
        weights['model.embed_tokens.weight'] = ours.pop('transformer.wte.weight')
        weights['model.norm.weight'] = ours.pop('transformer.ln_f.weight')
        if 'lm_head.weight' in ours:
            weights['lm_head.weight'] = ours.pop('lm_head.weight')
    weights = {k: v.contiguous() for k, v in weights.items()}
    return hf_config(config, vocab_size, layout, eot), weights


def from_hf(weights, config, folder):
    """model.py's state_dict from a folder's tensors in transformers' names."""
    lm_head = weights.pop('lm_head.weight', None)  # absent when tied
    state_dict = {}
    if not config.get('rope'):  # GPT-2
        for k, v in weights.items():
            k = k.removeprefix('transformer.')  # GPT2LMHeadModel's files say transformer.h.0...
            if k.endswith(('.attn.bias', '.attn.masked_bias')):
                continue  # the causal mask, which older transformers saved: not a weight
            state_dict['transformer.' + k] = v.t().contiguous() if k.endswith(HF_CONV1D) else v
    else:
        cfg = GPTConfig(**config)
        for i in range(cfg.n_layer):
            layer = f'model.layers.{i}.'
            for part in ('weight', 'bias') if cfg.bias else ('weight',):
                take = lambda name: weights.pop(f'{layer}{name}.{part}')  # noqa: E731
                state_dict[f'transformer.h.{i}.attn.c_attn.{part}'] = torch.cat(
                    [take('self_attn.q_proj'), take('self_attn.k_proj'), take('self_attn.v_proj')])
                state_dict[f'transformer.h.{i}.mlp.c_fc.{part}'] = torch.cat(
                    [take('mlp.gate_proj'), take('mlp.up_proj')])  # SwiGLU's W, V side by side
            for mine, theirs in llama_block_names(cfg, i):
                if theirs in weights:
                    state_dict[mine] = weights.pop(theirs)
        state_dict['transformer.wte.weight'] = weights.pop('model.embed_tokens.weight')
        state_dict['transformer.ln_f.weight'] = weights.pop('model.norm.weight')
        if weights:  # what this GPT has no place for: other logits than transformers'
            names = ', '.join(list(weights)[:5])
            raise ValueError(f"{folder}: weights this GPT does not compute: {names}")
    wte = state_dict['transformer.wte.weight']
    if config.get('tie_embeddings', True):
        if lm_head is not None and not torch.equal(lm_head, wte):
            raise ValueError(f"{folder}: lm_head differs from wte (the embedding), but "
                             f"config.json says tie_word_embeddings")
        state_dict['lm_head.weight'] = wte
    elif lm_head is None:
        raise ValueError(f"{folder}: config.json says the output weights are untied, but the "
                         f"folder has no lm_head.weight")
    else:
        state_dict['lm_head.weight'] = lm_head
    return state_dict


def read_files(folder):
    """{name: tensor} of a folder: model.safetensors, or its shards (model-00001-of-00003...), or
    pytorch_model.bin read with weights_only=True (a pickle that can only hold tensors)."""
    paths = (sorted(glob.glob(os.path.join(glob.escape(folder), 'model*.safetensors'))) or
             sorted(glob.glob(os.path.join(glob.escape(folder), 'pytorch_model*.bin'))))
    if not paths:
        raise ValueError(f"{folder} has no model.safetensors nor pytorch_model.bin")
    if paths[0].endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"reading {paths[0]} needs safetensors: "
                              f"pip install safetensors") from None
    else:  # weights_only: the file can hold only tensors, so loading it never runs code
        def load_file(path):
            return torch.load(path, map_location='cpu', weights_only=True)
    weights = {}
    for path in paths:
        try:
            weights.update(load_file(path))
        except Exception as e:  # truncated, or not what its name says
            first_line = (str(e).strip().splitlines() or [''])[0]
            raise ValueError(f"cannot read {path} ({type(e).__name__}: {first_line})") from None
    return weights


def from_pretrained(name_or_path, device='cpu', dtype=torch.float32, **overrides):
    """A GPT with the weights of a folder in one of the three layouts, or of a hub model:
    'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl' | a repository ('HuggingFaceTB/SmolLM2-135M').
    The model is built without an initialisation and takes the file's tensors, cast to dtype
    (float32 to train; bfloat16 halves a model's memory).
    overrides may set what leaves the weights alone: dropout (default 0.0), flash."""
    if set(overrides) - {'dropout', 'flash'}:
        raise ValueError(f"from_pretrained overrides only dropout and flash, "
                         f"not {sorted(overrides)}")
    folder = name_or_path if os.path.isdir(name_or_path) else download_model(name_or_path)
    config = {**read_config(folder), 'dropout': 0.0, **overrides}
    with torch.device('meta'):  # shapes only: the file's tensors become the weights
        model = GPT(GPTConfig(**config), init_weights=False)
    try:
        model.load_state_dict(from_hf(read_files(folder), config, folder), assign=True)
    except (RuntimeError, KeyError) as e:  # missing or unexpected names, other shapes
        message = ' '.join(str(e).split())[:300]  # in one line
        raise ValueError(f"{folder}: the weights do not fit its config.json ({message})") from None
    if model.config.tie_embeddings:
        model.transformer.wte.weight = model.lm_head.weight  # one tensor again (assign split them)
    return model.to(device=device, dtype=dtype)


def hf_tokenizer_of(folder):
    """The Tokenizer of a folder's tokenizer.json, with the folder's chat template (a model's own:
    conversations.py), or None where it has none (GPT-2's weights)."""
    if not os.path.isfile(os.path.join(folder, 'tokenizer.json')):
        return None
    spec = dict(type='tokenizers', file='tokenizer.json')
    probe = Tokenizer(spec, folder)
    return Tokenizer(spec, folder, eot=eot_of(probe.tok), chat=model_template(folder))
