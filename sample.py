"""
Samples text from a trained model:

    python sample.py --out_dir=out-shakespeare-char-cpu
    python sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:" --num_samples=3
    python sample.py --out_dir=out-shakespeare-char-cpu --start=FILE:prompt.txt --temperature=0
    python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=3
    python sample.py --init_from=path/to/hf-folder   # a Hugging Face folder: GPT-2, Llama, Qwen3

Text is encoded and decoded with the tokenizer of the data the model was trained on: a checkpoint's
dataset's (data/<dataset>/meta.json), a folder's tokenizer.json, or GPT-2's BPE for GPT-2's weights
(checkpoint.load_model). python sample.py --help
lists every setting.
"""

import os
from contextlib import nullcontext

import torch

import configurator
from checkpoint import load_model
from configurator import fail
from devices import resolve
from model import check_generate_args

# -----------------------------------------------------------------------------
# settings
init_from = 'resume'  # 'resume' (out_dir's) | a run's folder | FILE.pt | 'gpt2'.. | an HF folder
out_dir = 'out'  # folder holding ckpt.pt
ckpt_name = 'ckpt.pt'  # 'ckpt.pt' (the best model) | 'last.pt' (the latest state of training)
block_size = 0  # 0: the model's context length; a smaller one crops the model to it
start = "\n"  # the prompt; "FILE:prompt.txt" reads it from a file
num_samples = 10  # samples to draw (all at once, as one batch)
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # 1.0 samples the model's distribution, < 1.0 sharpens it, 0 is greedy
top_k = 200  # keep only the top_k most likely tokens at each step; 0 keeps all
stop_at_eot = True  # end a sample at the end-of-text token (where the tokenizer has one)
kv_cache = True  # keep each layer's keys and values: the same tokens, faster; False: full forwards
seed = 1337  # the same seed gives the same samples
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = 'auto'  # 'auto' | 'float32' | 'bfloat16' | 'float16'
# -----------------------------------------------------------------------------
configurator.configure(globals())

try:
    device, dtype, _, _ = resolve(device, dtype)  # 'auto' for this machine (devices.py)
    check_generate_args(max_new_tokens, temperature, top_k)  # now, not after loading the model
except ValueError as e:
    fail(e)
if num_samples < 1:
    fail(f"num_samples must be at least 1, not {num_samples}")
torch.manual_seed(seed)
# mixed precision: matmuls in bfloat16 or float16 where the device has them
ctx = nullcontext() if dtype == 'float32' else \
    torch.autocast(device.split(':')[0], getattr(torch, dtype))

# the model, and the tokenizer of the data it was trained on (GPT-2's BPE for GPT-2's weights)
try:  # the fused attention, whatever the run trained with: its forward is the faster one, bf16
    # included (only its CPU bf16 backward is slow: devices.pick_flash); a Hugging Face folder's
    # weights in bfloat16 where the matmuls run in it (half the memory)
    model, tok, _ = load_model(out_dir if init_from == 'resume' else init_from, device, ckpt_name,
                               block_size, 'bfloat16' if dtype == 'bfloat16' else 'float32',
                               flash=True)
except (ValueError, ImportError) as e:
    fail(e)

# the prompt
if start.startswith('FILE:'):
    path = start[len('FILE:'):]
    if not os.path.isfile(path):
        fail(f"prompt file '{path}' not found")
    try:
        with open(path, encoding='utf-8') as f:
            start = f.read()
    except UnicodeDecodeError as e:
        fail(f"prompt file '{path}' is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
             f"{e.start})")
if not start:
    fail("the prompt is empty: give at least one token with --start=TEXT (the default is a "
         "newline)")
try:
    start_ids = tok.encode(start)
except ValueError as e:
    fail(e)
if len(start_ids) > model.config.block_size:
    print(f"the prompt has {len(start_ids)} tokens; the model sees only the last "
          f"{model.config.block_size}")
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, :].repeat(num_samples, 1)  # N, T

# generate
with torch.no_grad(), ctx:
    y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k,
                       vocab_size=tok.n_vocab, use_cache=kv_cache)
for row in y.tolist():
    new = row[len(start_ids):]
    if stop_at_eot and tok.eot in new:
        new = new[:new.index(tok.eot)]  # the story ended here; what follows would be a new document
    print(tok.decode(start_ids + new))
    print('---------------')
