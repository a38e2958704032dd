"""
A conversation with a chat-finetuned model (docs/chat.md: prepare.py on conversations, train.py,
then this), or with an instruct model's Hugging Face folder (docs/llama.md):

    python chat.py --out_dir=out-chat-cpu
    python chat.py --init_from=out-sft/last.pt --system="Answer in one word." --temperature=0
    python chat.py --init_from=SmolLM2-135M-Instruct      # the model's own template
    echo "abc" | python chat.py --out_dir=out-chat-cpu   # piped: a user turn a line, a reply a line

The reply streams as it is generated and ends at the model's end of turn (our <|end|>, or the
folder's eos) or after max_new_tokens; the conversation stays in the model's context, its oldest
turns dropped once it no longer fits. /clear starts a new conversation, /quit (or the end of the
input) leaves. The template (conversations.py) is the one the data was prepared with, or the
folder's: a model without one is refused. python chat.py --help lists every setting.
"""

import sys
from contextlib import nullcontext

import torch

import configurator
from checkpoint import load_model
from conversations import render_prompt
from devices import resolve
from model import KVCache, check_generate_args

fail = configurator.fail

# -----------------------------------------------------------------------------
# settings
init_from = 'resume'  # 'resume' (out_dir's checkpoint) | a run's folder | a ckpt.pt file
out_dir = 'out'  # folder holding ckpt.pt
ckpt_name = 'ckpt.pt'  # 'ckpt.pt' (the best model) | 'last.pt' (the latest state of training)
system = ''  # a system prompt that opens every conversation ('' = none)
max_new_tokens = 256  # the longest reply, in tokens
temperature = 0.8  # 1.0 samples the model's distribution, < 1.0 sharpens it, 0 is greedy
top_k = 200  # keep only the top_k most likely tokens at each step; 0 keeps all
kv_cache = True  # keep the conversation's keys and values across turns (exact); False: recompute
seed = 1337  # the same seed gives the same replies
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = 'auto'  # 'auto' | 'float32' | 'bfloat16' | 'float16'
# -----------------------------------------------------------------------------
configurator.configure(globals())

try:
    device, dtype, _, _ = resolve(device, dtype)  # 'auto' for this machine (devices.py)
    check_generate_args(max_new_tokens, temperature, top_k)  # now, not after loading the model
except ValueError as e:
    fail(e)
generator = torch.Generator(device=device).manual_seed(seed)
# mixed precision: matmuls in bfloat16 or float16 where the device has them
ctx = nullcontext() if dtype == 'float32' else \
    torch.autocast(device.split(':')[0], getattr(torch, dtype))
try:
    source = out_dir if init_from == 'resume' else init_from
    # a Hugging Face folder's weights in bfloat16 where the matmuls run in it: half the memory
    model, tok, checkpoint = load_model(source, device, ckpt_name,
                                        dtype='bfloat16' if dtype == 'bfloat16' else 'float32')
except (ValueError, ImportError) as e:
    fail(e)
if tok.chat is None:
    dataset = checkpoint['config'].get('dataset') if checkpoint else 'gpt2'
    fail(f"this model was trained without a chat template (on {dataset}): finetune it on "
         f"conversations first, python prepare.py sft --input=CHATS.jsonl "
         f"--tokenizer=data/{dataset}, then python train.py --dataset=sft "
         f"--init_from=PATH/TO/ckpt.pt (docs/chat.md)")
try:  # a model's own template, rendered once now: one that is unsafe or broken ends here
    if tok.template:
        render_prompt(tok, [dict(role='user', content='hello')])
except ValueError as e:
    fail(f"{source}: {e}")
block_size = model.config.block_size
end_ids = tok.stop_ids  # <|end|> closes the reply (a marker opening another turn would too)
piped = not sys.stdin.isatty()


class Context:
    """The ids the model has seen in this conversation, their keys and values (KVCache, one per
    block), and the next token's logits. A new prompt that extends the ids fed so far feeds only
    what is new (exact: the
    same positions, the same keys and values); any other prompt is fed again from the start."""

    def __init__(self):
        self.ids, self.cache = [], None
        self.dropped = False  # whether turns were dropped, which is said once

    @torch.no_grad()
    def feed(self, ids):
        """Make ids the context; return the next token's logits (vocab_size,)."""
        extends = ids[:len(self.ids)] == self.ids and len(ids) > len(self.ids)
        if not (kv_cache and self.cache is not None and extends):  # from the start
            self.ids = []
            self.cache = [KVCache() for _ in model.transformer.h] if kv_cache else None
        new = ids[len(self.ids):]
        x = torch.tensor([new], dtype=torch.long, device=device)  # (1, T)
        with ctx:
            logits, _ = model(x, kv_cache=self.cache)  # (1, 1, vocab_size): the last position's
        self.ids = list(ids)
        return logits[0, -1].float()


def next_token(logits):
    logits = logits[:tok.n_vocab].clone()  # train.py may pad the vocabulary: those ids are no token
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[-1]] = -float('inf')
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def reply(history, context):
    """Generate the assistant's turn, printing it as it comes; return its text."""
    prompt = render_prompt(tok, history)
    reserve = min(max_new_tokens, block_size // 2)  # room for the reply
    first = int(history[0]['role'] == 'system')  # the system prompt stays
    while len(prompt) > block_size - reserve and len(history) > first + 1:
        if not context.dropped:
            print(f"(the conversation outgrows the model's context of {block_size} tokens: its "
                  f"oldest turns are "
                  f"dropped)", file=sys.stderr)
        context.dropped = True
        del history[first:first + 2]  # the oldest user turn and its reply
        prompt = render_prompt(tok, history)
    prompt = prompt[-block_size:]  # one user turn longer than the context: its end
    logits, out, shown = context.feed(prompt), [], ''
    for _ in range(max_new_tokens):
        token = next_token(logits)
        if token in end_ids:
            break
        out.append(token)
        text = tok.decode(out)
        if not text.endswith('\ufffd'):  # a character whose bytes are not all there yet waits
            print(text[len(shown):], end='', flush=True)
            shown = text
        if len(prompt) + len(out) >= block_size:  # the context is full: the reply stops here
            break
        logits = context.feed(prompt + out)
    text = tok.decode(out)
    print(text[len(shown):], flush=True)  # the rest, and the newline that ends the reply
    return text


def new_conversation():
    return [dict(role='system', content=system)] if system else [], Context()


history, context = new_conversation()
if not piped:
    print("a conversation: type a message; /clear starts a new one, /quit (or Ctrl-D) leaves")
while True:
    try:
        line = sys.stdin.readline() if piped else input('> ')
    except (EOFError, KeyboardInterrupt):
        print()
        break
    if piped and not line:  # the end of the input
        break
    line = line.rstrip('\n')
    if line.strip() == '/quit':
        break
    if line.strip() == '/clear':
        history, context = new_conversation()
        continue
    if not line.strip():
        continue
    try:
        tok.encode(line)
    except ValueError as e:  # a character a character-level model never saw
        print(f"({e})", file=sys.stderr)
        continue
    history.append(dict(role='user', content=line))
    history.append(dict(role='assistant', content=reply(history, context) or ' '))
