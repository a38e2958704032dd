"""
GPT-2 in the Hugging Face layout, read into this repository's GPT: GPT.from_pretrained (model.py)
calls these to load OpenAI's GPT-2 from the hub, or any folder in its layout, such as one written
by export_hf.py (which uses HF_CONV1D to write the same layout back).

The layout differs from model.py's in two ways only: the names may lack the 'transformer.'
prefix, and the weights of c_attn, c_proj and c_fc are stored transposed, (in, out), because
OpenAI's code multiplied by them through a "Conv1D" layer rather than nn.Linear.
"""

import glob
import json
import os

import torch

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
