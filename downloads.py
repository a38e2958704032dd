"""
Everything this project fetches from the network, and a one-line error when it cannot, saying how to
do without (put the file there yourself, pass a local path):

- download(url, path): a file by its URL (prepare.py's named datasets, scoring.py's HellaSwag);
- hub_batches(repo): a Hugging Face hub dataset, streamed (prepare.py: OpenWebText, Alpaca, ...);
- download_gpt2(name): GPT-2's weights from the hub (checkpoint.py's from_pretrained).

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


def download_gpt2(name):
    """The hub's GPT-2 folder, cached by huggingface_hub (which reads
    HF_ENDPOINT and HF_HUB_OFFLINE)."""
    if name not in GPT2_SIZES:
        raise ValueError(f"'{name}' is not a folder, nor one of {', '.join(GPT2_SIZES)}")
    try:
        from huggingface_hub import snapshot_download  # comes with transformers
    except ImportError:
        raise ImportError(f"downloading '{name}' needs the Hugging Face hub client: "
                          f"pip install transformers") from None
    # where OpenAI's models live on the hub ('gpt2' alone is a redirect)
    repo = f'openai-community/{name}'
    try:
        return snapshot_download(repo, allow_patterns=['config.json', 'model.safetensors'])
    except Exception as e:  # offline, a proxy, a wrong HF_ENDPOINT, a revoked repo...
        first_line = (str(e).strip().splitlines() or [''])[0]
        raise ValueError(f"cannot download '{name}' from the Hugging Face hub "
                         f"({type(e).__name__}: {first_line}); where it is reachable, run "
                         f"'hf download {repo} config.json model.safetensors --local-dir {name}', "
                         f"copy that folder here and pass its path instead") from None
