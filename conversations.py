"""
Conversations and preference pairs, from the shapes people have them in to token ids: reading the
records, the chat template that lays a conversation out (ours, or a model's own Jinja template),
and the dataset prepare.py writes of them (docs/chat.md, docs/design.md: Data on disk).

    conversation_messages({"messages": [...]})                   # OpenAI / Hugging Face
    conversation_messages({"conversations": [...]})              # ShareGPT: system, human, gpt
    conversation_messages({"instruction": ..., "output": ...})   # Alpaca
    pair_messages({"prompt": ..., "chosen": ..., "rejected": ...})   # TRL; minimind's lists too
    ids, mask = encode_conversation(tok, messages)   # mask 1: the assistant's replies, learned
    ids = render_prompt(tok, history)                # what a reply continues (chat.py)

Our template gives each role a marker whose id follows every id of the tokenizer, so a base
model's ids keep their meaning:

    <|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|><|user|>...

Text that spells a marker ('<|user|>') encodes as ordinary text: only the template puts the
markers in. A model's own template (a Hugging Face folder's tokenizer_config.json) is rendered in
Jinja's sandbox, as transformers renders it: a template cannot reach Python's objects.
"""

import functools
import json
import os
import shutil
from datetime import datetime

import numpy as np

from tokenizer import (GPT2_EOT, DataError, Tokenizer, eot_of, gpt2_encoding, load_meta, need,
                       tokenizers_file)

SHAREGPT_ROLES = {'system': 'system', 'human': 'user', 'user': 'user', 'gpt': 'assistant',
                  'assistant': 'assistant'}
# our template: a start marker per role, an end-of-turn marker; ids after the tokenizer's
CHAT_TOKENS = ('<|system|>', '<|user|>', '<|assistant|>', '<|end|>')
CHAT_LAYOUT = ("each message is <|ROLE|> + its content's ids + <|end|>; a conversation is its "
               "messages in order (an optional system message, then user and assistant "
               "alternating); a reply follows <|assistant|>; targets (mask 1): each assistant "
               "content and its <|end|>")

# -----------------------------------------------------------------------------
# records


def conversation_messages(record):
    """[{'role', 'content'}] of a record in a known shape: {"messages": [{"role", "content"}]}
    (OpenAI, Hugging Face), {"conversations": [{"from", "value"}]} (ShareGPT: system, human, gpt),
    {"instruction", "input", "output"} (Alpaca; the input, if any, follows the instruction after a
    blank line). A ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a record is a JSON object, not {type(record).__name__}")
    if isinstance(record.get('messages'), list):
        turns = [(m.get('role'), m.get('content')) if isinstance(m, dict) else (None, None)
                 for m in record['messages']]
    elif isinstance(record.get('conversations'), list):
        turns = [(SHAREGPT_ROLES.get(m.get('from')), m.get('value')) if isinstance(m, dict)
                 else (None, None) for m in record['conversations']]
    elif {'instruction', 'output'} <= record.keys():
        extra = record.get('input') or ''
        turns = [('user', record['instruction'] + ('\n\n' + extra if extra.strip() else '')),
                 ('assistant', record['output'])]
    else:
        keys = ', '.join(sorted(map(str, record))) or 'none'
        raise ValueError(f"a record of no known shape (keys: {keys}); expected 'messages', "
                         f"'conversations', or 'instruction' + 'output'")
    roles = [r for r, _ in turns]
    body = roles[1:] if roles[:1] == ['system'] else roles
    alternating = all(r == ('user', 'assistant')[i % 2] for i, r in enumerate(body))
    if not alternating or 'assistant' not in body:
        raise ValueError(f"roles {roles}: expected an optional system message, then user and "
                         f"assistant alternating, starting with user, with at least one assistant "
                         f"turn")
    for i, (role, content) in enumerate(turns):
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"message {i + 1} ({role}) has empty content")
    return [dict(role=r, content=c) for r, c in turns]


def pair_messages(record):
    """(prompt, chosen, rejected) of a preference pair: the conversation so far (messages ending
    with the user's turn) and two replies to it, from TRL's {"prompt", "chosen", "rejected"} (texts,
    or message lists) or minimind's {"chosen", "rejected"} (whole conversations that differ in
    their last, assistant, message). A ValueError names what is missing or wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a record is a JSON object, not {type(record).__name__}")
    missing = [k for k in ('chosen', 'rejected') if k not in record]
    if missing:
        raise ValueError(f"a preference pair needs 'chosen' and 'rejected' (and 'prompt' unless "
                         f"they are whole conversations): {', '.join(repr(k) for k in missing)} "
                         f"missing (it has {', '.join(sorted(map(str, record))) or 'nothing'})")
    texts = isinstance(record['chosen'], str) or isinstance(record['rejected'], str)
    if texts and 'prompt' not in record:  # replies alone: to what?
        raise ValueError(f"a preference pair whose replies are texts needs a 'prompt': 'prompt' "
                         f"missing (it has {', '.join(sorted(map(str, record)))})")
    prompt = record.get('prompt', [])
    prompt = [dict(role='user', content=prompt)] if isinstance(prompt, str) else prompt
    replies = []
    for key in ('chosen', 'rejected'):
        value = record[key]
        messages = prompt + ([dict(role='assistant', content=value)] if isinstance(value, str)
                             else list(value) if isinstance(value, list) else [None])
        try:
            messages = conversation_messages(dict(messages=messages))
        except ValueError as e:
            raise ValueError(f"'{key}': {e}") from None
        if messages[-1]['role'] != 'assistant':
            raise ValueError(f"'{key}' does not end with the assistant's reply")
        replies.append(messages)
    (context, chosen), (other, rejected) = [(m[:-1], m[-1]['content']) for m in replies]
    if context != other:
        raise ValueError("'chosen' and 'rejected' differ before their last message: a pair is two "
                         "replies to the same conversation")
    return context, chosen, rejected


def read_conversations(files, val_files=()):
    """(where, split, record) of each record of conversation files (a .jsonl file: one record a
    line; a .json file: one record or an array of them): where is 'FILE:LINE' for a message, split
    'val' for val_files' and 'auto' (split by prepare.py) for the others'. A file that is not JSON
    or not UTF-8 is a DataError naming it."""
    for split, paths in (('auto', files), ('val', val_files or [])):
        for path in paths:
            try:
                with open(path, encoding='utf-8') as f:
                    lines = list(enumerate(f, 1)) if path.endswith('.jsonl') else [(1, f.read())]
                records = []
                for n, line in lines:
                    if not line.strip():
                        continue
                    data = json.loads(line)
                    if path.endswith('.jsonl'):
                        records.append((f"{path}:{n}", data))
                    else:
                        data = data if isinstance(data, list) else [data]
                        records += [(f"{path}: record {i + 1}", r) for i, r in enumerate(data)]
            except json.JSONDecodeError as e:
                n = n if path.endswith('.jsonl') else e.lineno
                raise DataError(f"{path}:{n} is not JSON ({e.msg}): a .jsonl file holds one record "
                                f"per line, a .json file one record or an array of them") from None
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                                f"offset {e.start})") from None
            yield from ((where, split, r) for where, r in records)


# -----------------------------------------------------------------------------
# templates: a conversation's ids, and which of them are learned


@functools.lru_cache(maxsize=4)
def compile_jinja(template):
    """A chat template compiled once, in Jinja's immutable sandbox, with transformers' options."""
    jinja2 = need('jinja2', 'jinja2')
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=['jinja2.ext.loopcontrols'])
    env.filters['tojson'] = lambda x, indent=None, ensure_ascii=False, separators=None, \
        sort_keys=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii,
                                    separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def render_jinja(template, messages, add_generation_prompt, named=None):
    """A Hugging Face chat template (Jinja) rendered as transformers renders it (with the names
    bos_token, eos_token, ... of named), in Jinja's immutable sandbox: a template that reaches for
    Python's internals is a DataError, never run."""
    jinja2 = need('jinja2', 'jinja2')
    try:
        return compile_jinja(template).render(messages=messages,
                                              add_generation_prompt=add_generation_prompt,
                                              **(named or {}))
    except jinja2.exceptions.SecurityError as e:
        raise DataError(f"the chat template is unsafe, and was not run: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"the chat template fails on this conversation: {e}") from None


def encode_conversation(tok, messages, learn='all'):
    """(ids, mask) of a conversation (a list of {'role', 'content'}) in tok's template. mask[i] is
    1 where ids[i] is a target: an assistant's reply and what ends it (our <|end|>), so the model
    learns when to stop; the turns' markers, and what the system and the user say, are context.
    learn='last': only the last reply is a target (a preference pair's)."""
    replies = [i for i, m in enumerate(messages) if m['role'] == 'assistant']
    replies = replies[-1:] if learn == 'last' else replies
    if tok.template is not None:  # a model's own template: each reply is what it adds
        return encode_templated(tok, messages, replies)
    ids, mask = [], []
    for i, m in enumerate(messages):
        body = tok.encode(m['content']) + [tok.special['<|end|>']]
        ids += [tok.special[f"<|{m['role']}|>"]] + body
        mask += [0] + [int(i in replies)] * len(body)
    return ids, mask


def encode_templated(tok, messages, replies):
    """(ids, mask) under a Jinja template: reply i's targets are the ids that the conversation up
    to it adds to the conversation before it with the prompt for a reply. A template under which
    those are not each other's beginnings cannot be learned from this way: a DataError."""
    render = lambda upto, prompt: tok.encode_special(  # noqa: E731
        render_jinja(tok.template, messages[:upto], prompt, tok.chat['named']))
    ids = render(len(messages), False)
    mask = [0] * len(ids)
    for i in replies:
        before, through = render(i, True), render(i + 1, False)
        if ids[:len(through)] != through or through[:len(before)] != before:
            raise DataError("the model's chat template does not lay a conversation out as the "
                            "conversation before each reply, then the reply: prepare with our "
                            "template (without --chat_template=model)")
        mask[len(before):len(through)] = [1] * (len(through) - len(before))
    return ids, mask


def render_prompt(tok, history):
    """The ids a reply continues: the conversation so far (ending with the user's turn), then
    what opens the assistant's turn (our <|assistant|>, or the template's)."""
    if tok.template is not None:
        return tok.encode_special(render_jinja(tok.template, history, True, tok.chat['named']))
    return encode_conversation(tok, history)[0] + [tok.special['<|assistant|>']]


def model_template(folder):
    """meta.json's "chat" for a model folder's own template (tokenizer_config.json's chat_template,
    or chat_template.jinja), or None where it has none: the Jinja source, the named special tokens
    it may use, and the ids that end a reply (the eos tokens)."""
    def read(name):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return {}
        with open(path, encoding='utf-8') as f:
            return json.load(f) if name.endswith('.json') else {'chat_template': f.read()}
    config = read('tokenizer_config.json')
    template = config.get('chat_template') or read('chat_template.jinja').get('chat_template')
    if isinstance(template, list):  # several named templates: the default one
        template = next((t['template'] for t in template if t.get('name') == 'default'), None)
    if not template:
        return None
    named = {k: v.get('content') if isinstance(v, dict) else v for k, v in config.items()
             if k.endswith('_token') and isinstance(v, (str, dict))}
    tok = Tokenizer(dict(type='tokenizers', file='tokenizer.json'), folder)
    stop = read('generation_config.json').get('eos_token_id', [])
    stop = set(stop if isinstance(stop, list) else [stop])
    stop |= {tok.tok.token_to_id(named['eos_token'])} if named.get('eos_token') else set()
    return dict(jinja=template, named=named, stop=sorted(i for i in stop if i is not None),
                base_vocab_size=tok.n_vocab)


# -----------------------------------------------------------------------------
# a chat dataset: its tokenizer, then every conversation's ids and mask


def chat_template(n_ids, base_vocab_size):
    """meta.json's "chat" for our template: the markers' ids, after the tokenizer's n_ids ids.
    base_vocab_size: the ids the base model knows (a character vocabulary may have grown by
    characters it never saw: their ids start there)."""
    return dict(tokens={name: n_ids + i for i, name in enumerate(CHAT_TOKENS)},
                base_vocab_size=base_vocab_size, layout=CHAT_LAYOUT)


def chat_tokenizer(tokenizer, texts, chars, vocab_size, data_dir, path, template='ours'):
    """A chat dataset's tokenizer: --tokenizer's, whose ids keep their meaning (a base model's),
    then the ids it lacks after them: the characters of chars() it has not (a character vocabulary
    grows), then our template's markers; or, template='model', a model folder's own template
    (model_template) over its tokenizer, which gains no ids. tokenizer: 'data/<dataset>' (exactly
    that prepared dataset's, in data_dir; a chat dataset's as it is), 'char', 'gpt2', 'bpe'
    (trained on texts()) or a tokenizers file or folder; a tokenizers file is written to path
    (tokenizer.json.tmp, which prepare.py renames). Returns (the Tokenizer, meta.json's "tokenizer"
    spec, the end-of-text id, the template)."""
    out_dir, chat, eot = os.path.dirname(path), None, None
    if template == 'model':
        chat = os.path.isdir(tokenizer) and model_template(tokenizer)
        if not chat:
            raise DataError(f"--chat_template=model takes the template of a model's folder, and "
                            f"--tokenizer={tokenizer} is no folder with a chat_template")
    if tokenizer.startswith('data/'):  # exactly the tokenizer of a prepared dataset
        base_dir = os.path.join(data_dir, tokenizer[len('data/'):])
        try:
            base = load_meta(base_dir)
        except DataError as e:
            raise DataError(f"--tokenizer={tokenizer}: {e}") from None
        spec, eot, chat = base['tokenizer'], base.get('eot_id'), base.get('chat')  # as it is
        base_vocab = chat['base_vocab_size'] if chat else base['vocab_size']
        if spec['type'] == 'tokenizers':
            shutil.copy(os.path.join(base_dir, spec['file']), path)
            spec = dict(spec, file='tokenizer.json')
    elif tokenizer == 'char':
        spec, base_vocab = dict(type='char', chars=[]), None
    elif tokenizer == 'gpt2':
        spec, eot, base_vocab = dict(type='gpt2'), GPT2_EOT, gpt2_encoding().n_vocab
    else:
        tok = tokenizers_file(tokenizer, texts, vocab_size, path)
        spec, eot = dict(type='tokenizers', file='tokenizer.json'), eot_of(tok)
        base_vocab = tok.get_vocab_size()
    if spec['type'] == 'char':  # characters the base never saw: appended, in sorted order
        new = sorted(chars() - set(spec['chars']))
        if chat is not None and new:  # its markers follow its characters: no room
            raise DataError(f"the conversations have {len(new)} characters {tokenizer}'s "
                            f"vocabulary lacks ({''.join(new[:20])!r}), and a chat dataset's "
                            f"cannot grow (its markers follow its characters): use the dataset "
                            f"its base model learned, --tokenizer=data/<that dataset>")
        base_vocab = len(spec['chars']) if base_vocab is None else base_vocab
        if new and spec['chars']:
            print(f"{len(new)} characters the base vocabulary of {base_vocab} lacks get ids "
                  f"{base_vocab}..: {''.join(new)!r}")
        spec = dict(spec, chars=spec['chars'] + new)
        base_vocab = base_vocab or len(spec['chars'])  # no base: its characters are the base
    work_spec = dict(spec, file=os.path.basename(path)) if spec['type'] == 'tokenizers' else spec
    chat = chat or chat_template(Tokenizer(work_spec, out_dir).n_vocab, base_vocab)
    return Tokenizer(work_spec, out_dir, eot, chat), spec, eot, chat


def write_conversations(name, convs, tok, tmp, learn='all'):
    """Every conversation's ids, mask and start, per split, as the .tmp files of tmp; convs: a list
    of (split, messages). Returns meta.json's counts and the conversations' lengths."""
    dtype = 'uint16' if tok.n_vocab <= 2 ** 16 else 'uint32'
    meta, lengths = dict(vocab_size=tok.n_vocab, dtype=dtype), []
    for split in ('train', 'val'):
        encoded = [encode_conversation(tok, msgs, learn) for s, msgs in convs if s == split]
        n = np.array([len(ids) for ids, _ in encoded], dtype=np.uint64)
        np.array([i for ids, _ in encoded for i in ids], dtype=dtype).tofile(tmp[f'{split}.bin'])
        np.array([m for _, mask in encoded for m in mask], dtype=np.uint8).tofile(
            tmp[f'{split}_mask.bin'])
        (np.cumsum(n) - n).tofile(tmp[f'{split}_starts.bin'])  # where each one starts, in tokens
        meta.update({f'{split}_tokens': int(n.sum()), f'{split}_conversations': len(encoded)})
        lengths += n.tolist()
    return meta, lengths


# -----------------------------------------------------------------------------
# a dataset of them, for prepare.py

def encode_conversations(name, records, tokenizer, vocab_size, val_fraction, template, tmp,
                         data_dir):
    """Every conversation (or preference pair: its two conversations, chosen then rejected, only
    their last replies learned) through the chat template: ids, masks and starts of both splits
    (as .tmp files), and meta.json's dict. Every k-th record validates. Conversations are stored
    whole: train.py cuts one that outgrows a row."""
    out_dir = os.path.dirname(tmp['meta.json'])
    convs, skipped, pairs = [], 0, None
    for where, split, record in records():
        if pairs is None and isinstance(record, dict):  # the first record says what the file holds
            pairs = 'chosen' in record or 'rejected' in record
        try:
            if pairs:  # two conversations: the same prompt, the chosen and the rejected reply
                prompt, chosen, rejected = pair_messages(record)
                convs.append([split, [prompt + [dict(role='assistant', content=reply)]
                                      for reply in (chosen, rejected)]])
            else:
                convs.append([split, [conversation_messages(record)]])
        except ValueError as e:
            if where is None:  # the hub's datasets hold a few empty outputs: skipped, and said
                skipped += 1
                continue
            raise DataError(f"{where}: {e}") from None
    k, auto = max(2, round(1 / val_fraction)), [c for c in convs if c[0] == 'auto']
    k = k if len(auto) < len(convs) else min(k, len(auto))  # at least the last one validates
    for i, c in enumerate(auto):
        c[0] = 'val' if (i + 1) % k == 0 else 'train'
    if not any(s == 'train' for s, _ in convs):
        raise DataError(f"the input has {len(convs)} record(s); at least 2 are needed (one trains, "
                        f"one validates)")
    texts = lambda: (m['content'] for s, group in convs if s == 'train' for c in group for m in c)
    chars = lambda: set().union(*(m['content'] for _, group in convs for c in group for m in c))
    tok, spec, eot, chat = chat_tokenizer(tokenizer, texts, chars, vocab_size, data_dir,
                                          tmp['tokenizer.json'], template)
    flat = [(s, c) for s, group in convs for c in group]  # a pair's two, side by side
    meta, lengths = write_conversations(name, flat, tok, tmp, learn='last' if pairs else 'all')
    meta.update(tokenizer=spec, eot_id=eot, chat=chat)
    if pairs:
        meta.update({f'{s}_pairs': meta[f'{s}_conversations'] // 2 for s in ('train', 'val')})
    what = 'preference pairs' if pairs else 'conversations'
    longer = ', '.join(f"{sum(n > b + 1 for n in lengths):,} longer than {b}"
                       for b in (256, 512, 1024))
    print(f"{name}: {meta[f'train_{what.split()[-1]}']:,} train and "
          f"{meta[f'val_{what.split()[-1]}']:,} val {what}"
          f"{f' ({skipped:,} malformed records skipped)' if skipped else ''}, vocab "
          f"{tok.n_vocab:,} (the chat template's ids {min(tok.special_ids)}.."
          f"{max(tok.special_ids)}), {meta['train_tokens']:,} train and {meta['val_tokens']:,} val "
          f"tokens in {out_dir}; the longest has {max(lengths):,} tokens, {longer} (train.py cuts "
          f"a conversation at block_size + 1 tokens)")
    return meta
