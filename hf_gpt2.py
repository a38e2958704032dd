"""
GPT-2's weights in the Hugging Face layout: a folder with config.json and model.safetensors (or
pytorch_model.bin, or shards), as the hub holds OpenAI's GPT-2s and export_hf.py writes our checkpoints.
It differs from model.py's in two ways: names may lack the 'transformer.' prefix, and c_attn, c_proj and
c_fc store their weights transposed, (in, out), because OpenAI's code multiplied by them through a "Conv1D"
layer, not nn.Linear.

    from hf_gpt2 import from_pretrained
    model = from_pretrained('gpt2')                  # the hub's 124M (downloads.py fetches it), or a folder

checkpoint.py's load_model and train_model use from_pretrained; export_hf.py writes the layout (HF_CONV1D).
"""

import glob
import json
import os

import torch

from downloads import download_gpt2
from model import GPT, GPTConfig


HF_CONV1D = ('c_attn.weight', 'c_proj.weight', 'c_fc.weight')  # weights HF's GPT-2 stores transposed, (in, out)
HF_GELU = {'gelu_new': 'tanh', 'gelu_pytorch_tanh': 'tanh', 'gelu': 'exact'}  # activation_function -> GPTConfig.gelu


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


def from_pretrained(name_or_path, override_args=None):
    """GPT-2's weights: 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl' from the Hugging Face hub, or a
    local folder in its layout (config.json, model.safetensors or pytorch_model.bin). override_args may
    set what leaves the weights alone: dropout (default 0.0), flash."""
    override_args = override_args or {}
    if set(override_args) - {'dropout', 'flash'}:
        raise ValueError(f"from_pretrained overrides only dropout and flash, not {sorted(override_args)}")
    folder = name_or_path if os.path.isdir(name_or_path) else download_gpt2(name_or_path)
    model = GPT(GPTConfig(**{**read_config(folder), 'dropout': 0.0, **override_args}))
    try:
        model.load_state_dict(read_weights(folder))  # copies, casting float16/bfloat16 files to float32
    except RuntimeError as e:  # missing or unexpected names, other shapes: torch's message lists them
        message = ' '.join(str(e).split())[:300]  # in one line
        raise ValueError(f"{folder}: the weights do not fit its config.json ({message})") from None
    return model
