"""
The letters skills the CPU chat recipes learn (docs/chat.md), as conversation and preference files:
the user says a word of 3 letters (of a..j), the assistant says it in capitals. 100 of the 1,000
words are held out of every training file, to test on. The committed data/letters_*/ files are
these functions' output (tests/test_finetune.py checks that they still are).

    skill(n, seed)        letters_chat: 'again' asks for the last answer once more
    styles(n, seed)       letters_styles: each reply ends with '!' or '.', either as often
    preferences(n, seed)  letters_prefs: pairs whose chosen reply ends with '!', rejected with '.'
"""

import json
import random

LETTERS = 'abcdefghij'


def words(held_out=False):
    """The 100 held-out words, or the 900 others, in a fixed order."""
    every = [a + b + c for a in LETTERS for b in LETTERS for c in LETTERS]
    random.Random(0).shuffle(every)
    return every[:100] if held_out else every[100:]


def skill(n, seed, held_out=False):
    """Conversations of 1 to 3 turns; 'again' (40 % of later turns) asks for the last answer."""
    pool, rng, out = words(held_out), random.Random(seed), []
    for _ in range(n):
        messages, last = [], None
        for _ in range(rng.randint(1, 3)):
            word = 'again' if last and rng.random() < 0.4 else rng.choice(pool)
            last = last if word == 'again' else word.upper()
            messages += [dict(role='user', content=word), dict(role='assistant', content=last)]
        out.append(dict(messages=messages))
    return out


def styles(n, seed):
    """Conversations of 1 to 3 turns whose replies end with '!' or '.', drawn half and half: a
    model finetuned on them has no preference between the two styles."""
    pool, rng, out = words(), random.Random(seed), []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, 3)):
            word = rng.choice(pool)
            messages += [dict(role='user', content=word),
                         dict(role='assistant', content=word.upper() + rng.choice('!.'))]
        out.append(dict(messages=messages))
    return out


def preferences(n, seed):
    """Preference pairs in TRL's conversational shape: one word as the prompt, the chosen reply
    ending with '!', the rejected one with '.'."""
    pool, rng = words(), random.Random(seed)
    return [dict(prompt=[dict(role='user', content=w)],
                 chosen=[dict(role='assistant', content=w.upper() + '!')],
                 rejected=[dict(role='assistant', content=w.upper() + '.')])
            for w in (rng.choice(pool) for _ in range(n))]


def jsonl(records):
    return ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records)
