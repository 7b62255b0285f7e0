"""MATH-style final answers: the last `\\boxed{...}` (nested braces), normalised so that simple
forms of the same answer compare equal (`\\frac{1}{2}`, `\\dfrac12`, `1/2` and `0.5` alike)."""

from __future__ import annotations

import re
from typing import Optional

from .math_numbers import THOUSANDS, same_answer

_BOXED = re.compile(r"\\(?:boxed|fbox)")


def braced(text: str, start: int) -> Optional[tuple[str, int]]:
    """(content, end) of the brace group opening at text[start] == "{", nested braces counted."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1 : i], i + 1
    return None


def boxed_answer(text: str) -> Optional[str]:
    """The content of the last `\\boxed{...}` (or `\\boxed 5`), None if there is none or it is unclosed."""
    found = list(_BOXED.finditer(text))
    if not found:
        return None
    rest = text[found[-1].end() :]
    if rest.lstrip().startswith("{"):
        group = braced(rest, len(rest) - len(rest.lstrip()))
        return group[0] if group else None
    bare = re.match(r"\s+([^\s$]+)", rest)  # "\boxed 5": the token after the space
    return bare.group(1) if bare else None


def _frac_to_slash(text: str) -> str:
    """\\frac{a}{b} -> a/b (parenthesised where a or b is compound), \\frac12 -> 1/2, innermost first."""
    while True:
        at = text.rfind("\\frac")
        if at < 0:
            return text
        parts, end = [], at + len("\\frac")
        for _ in range(2):
            if end < len(text) and text[end] == "{":
                group = braced(text, end)
                if group is None:
                    return text
                part, end = group
            elif end < len(text):
                part, end = text[end], end + 1
            else:
                return text
            compound = re.search(r"[+*/]|(?<!^)-", part)  # an operator outside a leading sign
            parts.append(f"({part})" if compound else part)
        text = text[:at] + "/".join(parts) + text[end:]


_REMOVE = (r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", "^{\\circ}", "^\\circ", r"\%", "%", r"\$", "$")


def normalize_math(answer: str) -> str:
    """Remove what does not change the answer (spacing, sizing, units of degrees and percent,
    dollar signs, a trailing period, a leading `x =`), then write fractions as a/b."""
    text = answer.strip()
    boxed = boxed_answer(text)
    text = boxed if boxed is not None else text
    text = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", text)
    for piece in _REMOVE:
        text = text.replace(piece, "")
    text = text.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac")
    text = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", text)
    text = re.sub(r"\s+", "", text).rstrip(".")
    text = re.sub(r"^[a-zA-Z]\w?=", "", text)  # "x=5": the value is the answer
    if THOUSANDS.match(text):
        text = text.replace(",", "")
    return _frac_to_slash(text)


def same_math_answer(predicted: Optional[str], gold: str) -> bool:
    """Exact match after normalisation; numbers (and a/b fractions of numbers) compared by value."""
    return predicted is not None and same_answer(normalize_math(predicted), normalize_math(gold))
