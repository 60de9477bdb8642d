"""Whole-number tokens: every number of a corpus's ranges as one token (``data.tokenizer=bpe_numbers``).

A byte-level BPE trained on a small corpus to a few hundred ids keeps digits apart: ``" 1952"`` is ``" 19"``,
``"5"``, ``"2"``. Reading such a value from a context then means copying a run of single digits, and copying the
digit after ``" 19"`` is ambiguous as soon as the context holds two dates (every year starts with ``" 19"``): an
induction head that matches one previous token cannot tell them apart. With each whole number one token, a date
is three values to look up (month, day, year), as a city or an employer is one.

Which numbers: the corpus's numbers fall into classes by digit count and by whether a space precedes them
(``" 22"``, ``" 1952"``); each class gets every integer from its smallest to its largest value, so a value of
the same range that the corpus happens not to contain (an unseen person's birth year) is one token too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

NUMBER = re.compile(r"(?<![0-9])( ?)([0-9]+)(?![0-9])")


def number_tokens(texts: Iterable[str]) -> list[str]:
    """The whole-number tokens of ``texts``: per class (leading space or not, digit count), every integer from
    the smallest to the largest value seen, written as in the text (numbers with leading zeros are left out: the
    class of ``"07"`` keeps only two-digit values from 10 up). Sorted by class, then value."""
    bounds: dict[tuple[str, int], tuple[int, int]] = {}
    for text in texts:
        for space, digits in NUMBER.findall(text):
            if len(digits) > 1 and digits[0] == "0":
                continue
            key, value = (space, len(digits)), int(digits)
            low, high = bounds.get(key, (value, value))
            bounds[key] = (min(low, value), max(high, value))
    return [space + str(v) for (space, _), (low, high) in sorted(bounds.items()) for v in range(low, high + 1)]


def without_numbers(text: str) -> str:
    """``text`` with its numbers (and the space before each) removed: what BPE trains on when every number is
    already a token of its own (the merges go to words)."""
    return NUMBER.sub("", text)
