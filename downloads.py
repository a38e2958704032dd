"""
Everything this project fetches from the network, and a one-line error when it cannot, saying how to
do without (put the file there yourself, pass a local path):

- download(url, path): a file by its URL (prepare.py's named datasets, scoring.py's HellaSwag);
- hub_batches(repo): a Hugging Face hub dataset, streamed (prepare.py: OpenWebText, Alpaca, ...);
- download_model(name): a model's folder from the hub: GPT-2's, or any repository's.

HF_ENDPOINT points the hub's URLs at a mirror (huggingface_hub reads it too). Nothing else
downloads: tokenizer.py reads only committed and prepared files.
"""

import http.client
import os
import shutil
import urllib.request

from tokenizer import DataError, need

# mirrors set HF_ENDPOINT
HF_ENDPOINT = os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')

# the hub's GPT-2s as (n_layer, n_head, n_embd): 124M, 350M, 774M and 1558M parameters
GPT2_SIZES = {'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024),
              'gpt2-large': (36, 20, 1280), 'gpt2-xl': (48, 25, 1600)}


def download(url, path, hint):
    """Stream url to path via a temporary file of this process (under torchrun each may download),
    so an interrupted download leaves nothing. A failure is a DataError 'cannot download URL (why)'
    + hint, which says how to do without."""
    print(f"downloading {url}", flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, 'wb') as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except BaseException as e:  # a failure, or Ctrl-C: no partial file is left
        if os.path.exists(tmp):
            os.remove(tmp)
        # HTTPException: a connection cut mid-file
        if not isinstance(e, (OSError, http.client.HTTPException)):
            raise
        raise DataError(f"cannot download {url} ({getattr(e, 'reason', e)}){hint}") from None
    os.replace(tmp, path)


def hub_batches(repo, n=256, column='text'):
    """Lists of n documents of a Hugging Face hub dataset, streamed (only its parquet files are
    cached); column=None: lists of whole records (dicts)."""
    datasets = need('datasets', 'datasets')
    datasets.logging.set_verbosity_error()  # the error below says it in one line; no retry warnings
    need('huggingface_hub', 'huggingface_hub').utils.logging.set_verbosity_error()
    try:
        rows = datasets.load_dataset(repo, split='train', streaming=True,
                                     revision='refs/convert/parquet')
        for batch in rows.iter(batch_size=n):
            yield (batch[column] if column
                   else [dict(zip(batch, row)) for row in zip(*batch.values())])
    except Exception as e:  # datasets raises many kinds: connection, HTTP, offline mode, ...
        raise DataError(f"cannot read {repo} from the hub at {HF_ENDPOINT} ({type(e).__name__}: "
                        f"{e}). Without access to it, put the text in .txt files and pass them "
                        f"with --input=FOLDER") from None


def is_hub_model(name):
    """A name the hub knows models by: 'gpt2' ... 'gpt2-xl', or a repository 'owner/name' (such as
    'HuggingFaceTB/SmolLM2-135M') that is no folder here."""
    return name in GPT2_SIZES or (name.count('/') == 1 and not os.path.exists(name)
                                  and all(name.split('/')) and not name.endswith('.pt'))


def download_model(name):
    """The folder of a hub model (is_hub_model), cached by huggingface_hub (which reads HF_ENDPOINT
    and HF_HUB_OFFLINE): its config, weights (safetensors only: loading them never runs code),
    tokenizer and chat template."""
    if not is_hub_model(name):
        raise ValueError(f"'{name}' is not a folder, nor one of {', '.join(GPT2_SIZES)}, nor a "
                         f"hub repository such as HuggingFaceTB/SmolLM2-135M")
    try:
        from huggingface_hub import snapshot_download  # comes with transformers
    except ImportError:
        raise ImportError(f"downloading '{name}' needs the Hugging Face hub client: "
                          f"pip install transformers") from None
    # where OpenAI's models live on the hub ('gpt2' alone is a redirect)
    repo = f'openai-community/{name}' if name in GPT2_SIZES else name
    files = ['config.json', '*.safetensors', 'model.safetensors.index.json', 'tokenizer.json',
             'tokenizer_config.json', 'generation_config.json', 'chat_template.jinja']
    try:
        return snapshot_download(repo, allow_patterns=files)
    except Exception as e:  # offline, a proxy, a wrong HF_ENDPOINT, a revoked repo...
        first_line = (str(e).strip().splitlines() or [''])[0]
        raise ValueError(f"cannot download '{name}' from the Hugging Face hub "
                         f"({type(e).__name__}: {first_line}); where it is reachable, run "
                         f"'hf download {repo} --local-dir {name.split('/')[-1]}', copy that "
                         f"folder here and pass its path instead") from None
