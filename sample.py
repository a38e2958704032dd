"""
Samples text from a trained model:

    python sample.py --out_dir=out-shakespeare-char-cpu
    python sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:" --num_samples=3
    python sample.py --out_dir=out-shakespeare-char-cpu --start=FILE:prompt.txt --temperature=0
    python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=3
    python sample.py --init_from=path/to/hf-folder   # a Hugging Face GPT-2 folder (export_hf.py writes one)

Text is encoded and decoded with the tokenizer of the data the model was trained on: a checkpoint's
dataset's (data/<dataset>/meta.json), or GPT-2's BPE for GPT-2's weights. python sample.py --help
lists every setting.
"""

import os

import torch

import configurator
from configurator import fail
from model import GPT, autocast_context, load_checkpoint, pick_device, pick_dtype
from prepare import DATA_DIR, GPT2_EOT, DataError, gpt2_encoding, load_meta, load_tokenizer

# -----------------------------------------------------------------------------
# settings
init_from = 'resume'  # 'resume' (out_dir/ckpt.pt) | 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl' | an HF folder
out_dir = 'out'  # folder holding ckpt.pt
ckpt_name = 'ckpt.pt'  # 'ckpt.pt' (the best model) | 'last.pt' (the latest state of training)
block_size = 0  # 0: the model's context length; a smaller one crops the model to it
start = "\n"  # the prompt; "FILE:prompt.txt" reads it from a file
num_samples = 10  # samples to draw (all at once, as one batch)
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # 1.0 samples the model's distribution, < 1.0 sharpens it, 0 is greedy
top_k = 200  # keep only the top_k most likely tokens at each step; 0 keeps all
stop_at_eot = True  # end a sample at the end-of-text token (where the tokenizer has one)
kv_cache = True  # keep each layer's keys and values: ~4x faster up to block_size, same tokens; False: full forward per token
seed = 1337  # the same seed gives the same samples
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = 'auto'  # 'auto' | 'float32' | 'bfloat16' | 'float16'
# -----------------------------------------------------------------------------
configurator.configure(globals())

try:
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
except ValueError as e:
    fail(e)
if max_new_tokens <= 0:
    fail(f"max_new_tokens must be at least 1, not {max_new_tokens}")
if temperature < 0:
    fail(f"temperature must be >= 0 (0 is greedy), not {temperature}")
if top_k < 0:
    fail(f"top_k must be >= 0 (0 keeps every token), not {top_k}")
if num_samples < 1:
    fail(f"num_samples must be at least 1, not {num_samples}")
torch.manual_seed(seed)
ctx = autocast_context(device, dtype)

# the model, and the tokenizer of the data it was trained on
if init_from == 'resume':
    ckpt_path = os.path.join(out_dir, ckpt_name)
    if not os.path.isfile(ckpt_path) and ckpt_name == 'ckpt.pt' and os.path.isfile(os.path.join(out_dir, 'last.pt')):
        ckpt_path = os.path.join(out_dir, 'last.pt')  # stopped before its first evaluation: the latest
        print(f"(no ckpt.pt yet: sampling from {ckpt_path})")
    if not os.path.isfile(ckpt_path):
        fail(f"no checkpoint at {ckpt_path}: train one first (python train.py ...), or fix --out_dir")
    try:
        model, checkpoint = load_checkpoint(ckpt_path, device, dropout=0.0)
    except ValueError as e:
        fail(e)
    dataset = checkpoint['config']['dataset']
    data_dir = os.path.join(DATA_DIR, dataset)
    try:
        meta = load_meta(data_dir)
        encode, decode = load_tokenizer(meta, data_dir)
    except DataError as e:
        fail(e)
    vocab_size, eot = meta['vocab_size'], meta.get('eot_id')
    if vocab_size > model.config.vocab_size:
        fail(f"data/{dataset} now has a vocabulary of {vocab_size:,}, but the model was trained on "
             f"{model.config.vocab_size:,}: prepare the dataset again as it was for this model")
else:  # GPT-2's weights, by name from the Hugging Face hub or from a local folder
    try:
        model = GPT.from_pretrained(init_from, dict(dropout=0.0))
        enc = gpt2_encoding()
    except (ValueError, ImportError, DataError) as e:
        fail(e)
    if model.config.vocab_size != enc.n_vocab:
        fail(f"{init_from} has a vocabulary of {model.config.vocab_size:,} tokens, not GPT-2's {enc.n_vocab:,}: "
             f"sample it from its checkpoint (--init_from=resume --out_dir=...)")
    model.to(device)
    encode, decode = enc.encode_ordinary, enc.decode
    vocab_size, eot = enc.n_vocab, GPT2_EOT
model.eval()
if block_size > model.config.block_size:
    fail(f"block_size {block_size} is larger than the model's {model.config.block_size}: it has no position "
         f"embeddings beyond that; use at most {model.config.block_size} (0 keeps it)")
if 0 < block_size < model.config.block_size:
    model.crop_block_size(block_size)  # fewer positions: faster, and what a model trained shorter saw

# the prompt
if start.startswith('FILE:'):
    path = start[len('FILE:'):]
    if not os.path.isfile(path):
        fail(f"prompt file '{path}' not found")
    try:
        with open(path, encoding='utf-8') as f:
            start = f.read()
    except UnicodeDecodeError as e:
        fail(f"prompt file '{path}' is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})")
if not start:
    fail("the prompt is empty: give at least one token with --start=TEXT (the default is a newline)")
try:
    start_ids = encode(start)
except DataError as e:
    fail(e)
if len(start_ids) > model.config.block_size:
    print(f"the prompt has {len(start_ids)} tokens; the model sees only the last {model.config.block_size}")
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, :].repeat(num_samples, 1)  # (num_samples, T)

# generate
with torch.no_grad(), ctx:
    y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, vocab_size=vocab_size,
                       use_cache=kv_cache)
for row in y.tolist():
    new = row[len(start_ids):]
    if stop_at_eot and eot in new:
        new = new[:new.index(eot)]  # the story ended here; what follows would be a new document
    print(decode(start_ids + new))
    print('---------------')
