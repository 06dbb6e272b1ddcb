"""A synthetic retrieval probe for long context, generated here (no download): a line
"The secret code of <key> is <6 digits>." planted at depth d of a distractor text of L tokens,
and at the end the question; the model passes when its greedy continuation holds the digits.
`argonne-ds eval --probe retrieval --probe-lengths 4096 32768 --probe-depths 0.1 0.5 0.9`.
After a 4k -> 32k extension, accuracy at 32k and at depths before the last 4k says whether the
model reads the new context, not only the old window.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Plain, topic-neutral filler: nothing in it resembles the planted line.
FILLER = (
    "The river bends twice before it reaches the town, and the old mill stands where the "
    "water slows. In spring the fields turn green and the farmers walk the long road to the "
    "market. Children count the boats that pass under the bridge, and the baker opens his "
    "shop before dawn. Nobody remembers when the clock on the square last told the right time. "
    "The library keeps its windows open in summer, and the pages of the newspapers rustle in "
    "the wind. Every evening the lamps are lit one by one along the harbour wall. "
)
KEYS = ("falcon", "harbor", "juniper", "quartz", "meadow", "lantern", "cobalt", "willow",
        "saffron", "granite", "orchid", "tundra")


@dataclass(frozen=True)
class Example:
    prompt: list[int]  # exactly `length` tokens
    value: str  # the six digits to retrieve
    needle_at: int  # the token index where the planted line starts


def examples(encode: Callable[[str], list[int]], length: int, depth: float, n: int,
             seed: int = 0) -> list[Example]:
    """`n` prompts of `length` tokens with the line planted at `depth` (0 = the start, 1 = just
    before the question) of the distractor."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"probe depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{seed}-{length}-{depth}")
    filler = encode(FILLER)
    out = []
    for _ in range(n):
        key, value = f"{rng.choice(KEYS)}-{rng.randrange(100, 1000)}", f"{rng.randrange(10**6):06d}"
        needle = encode(f" The secret code of {key} is {value}. ")
        question = encode(f" What is the secret code of {key}? The secret code of {key} is")
        room = length - len(needle) - len(question)
        if room < 1:
            raise ValueError(f"probe length {length} is too short for the planted line and the "
                             f"question ({len(needle) + len(question)} tokens)")
        haystack = (filler * (room // len(filler) + 1))[:room]
        at = int(round(depth * room))
        out.append(Example(haystack[:at] + needle + haystack[at:] + question, value, at))
    return out


def retrieval_probe(generate: Callable[[list[list[int]]], list[str]],
                    encode: Callable[[str], list[int]], lengths: Sequence[int],
                    depths: Sequence[float], n: int = 4, seed: int = 0) -> dict[str, float]:
    """Accuracy per "length@depth": `generate(prompts)` returns each greedy continuation's
    text; a hit when the six digits appear in it."""
    result = {}
    for length in lengths:
        for depth in depths:
            cases = examples(encode, length, depth, n, seed)
            texts = generate([c.prompt for c in cases])
            hits = sum(c.value in text.replace(" ", "") for c, text in zip(cases, texts))
            result[f"{length}@{depth:g}"] = hits / len(cases)
    return result
