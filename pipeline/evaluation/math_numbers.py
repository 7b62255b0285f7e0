"""GSM8K-style final answers: the number after `#### ` (strict) or the last number (flexible).

Numbers tolerate `$`, thousands commas (1,234), a sentence's trailing `.`, a minus sign and
decimals; they compare as exact fractions, so 3.50 == 3.5 and 1,000 == 1000.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

# Thousands groups only when well formed ("1,234"; "1,2,3" is three numbers); the sign's
# lookbehind keeps "10-3" from reading as -3; digits glued to a word ("p021", "H2O") are no number.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]])-)?\$?(?<![\w.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
    r"|(?<![\w.])-?\.\d+"
)
_STRICT = re.compile(r"####\s*")
THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def clean_number(text: str) -> str:
    """The matched number as plain digits: no `$`, commas or spaces."""
    return re.sub(r"[\s$,]", "", text)


def parse_number(text: str) -> Optional[Fraction]:
    """An exact value for a plain number ("-3.50", "12", "1/2"), else None."""
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def flexible_answer(text: str) -> Optional[str]:
    """The last number in the text."""
    found = _NUMBER.findall(text)
    return clean_number(found[-1]) if found else None


def strict_answer(text: str) -> Optional[str]:
    """The number right after the first `####` (the GSM8K answer format), else None."""
    marker = _STRICT.search(text)
    if marker is None:
        return None
    number = _NUMBER.match(text, marker.end())
    return clean_number(number.group()) if number else None


def gold_gsm8k(answer: str) -> Optional[str]:
    """The reference after the last `####` of a GSM8K answer, cleaned; None without a marker."""
    if "####" not in answer:
        return None
    final = answer.rsplit("####", 1)[1].strip()
    number = _NUMBER.fullmatch(final.rstrip("."))
    return clean_number(number.group()) if number else final


def same_answer(predicted: Optional[str], gold: str) -> bool:
    """Numerically equal when both are numbers, else equal as text."""
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(gold)
    if a is not None and b is not None:
        return a == b
    return predicted == gold
