"""
Conversations and preference pairs in the shapes people have them, read from .jsonl / .json files
into plain lists of messages ({'role', 'content'}); tokenizer.py's chat template turns them into ids
and prepare.py writes them as a dataset (docs/chat.md).

    conversation_messages({"messages": [...]})          # OpenAI / Hugging Face
    conversation_messages({"conversations": [...]})     # ShareGPT: system, human, gpt
    conversation_messages({"instruction": ..., "output": ...})   # Alpaca
"""

import json

from tokenizer import DataError

SHAREGPT_ROLES = {'system': 'system', 'human': 'user', 'user': 'user', 'gpt': 'assistant',
                  'assistant': 'assistant'}


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
        raise ValueError(f"a record of no known shape (keys: "
                         f"{', '.join(sorted(map(str, record))) or 'none'}); "
                         f"expected 'messages', 'conversations', or 'instruction' + 'output'")
    roles = [r for r, _ in turns]
    body = roles[1:] if roles[:1] == ['system'] else roles
    if (any(r != ('user', 'assistant')[i % 2] for i, r in enumerate(body))
            or 'assistant' not in body):
        raise ValueError(f"roles {roles}: expected an optional system message, then user and "
                         f"assistant alternating, starting with user, with at least one assistant "
                         f"turn")
    for i, (role, content) in enumerate(turns):
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"message {i + 1} ({role}) has empty content")
    return [dict(role=r, content=c) for r, c in turns]


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
                    if line.strip():
                        data = json.loads(line)
                        records += [(f"{path}:{n}", data)] if path.endswith('.jsonl') else \
                            [(f"{path}: record {i + 1}", r)
                             for i, r in enumerate(data if isinstance(data, list) else [data])]
            except json.JSONDecodeError as e:
                n = n if path.endswith('.jsonl') else e.lineno
                raise DataError(f"{path}:{n} is not JSON ({e.msg}): a .jsonl file holds one record "
                                f"per line, a .json file one record or an array of them") from None
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                                f"offset {e.start})") from None
            yield from ((where, split, r) for where, r in records)


