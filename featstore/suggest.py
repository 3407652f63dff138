"""'Did you mean' for names a user types: backbones, preprocessings, sources, embedding sets."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name, choices: Iterable) -> str:
    """' (did you mean 'x'?)' when a choice is close to name, else ''. The closest only, unless others
    are as close: names that differ by one letter (synthetic-a, synthetic-b) are all near a typo."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3, cutoff=0.6)
    score = [difflib.SequenceMatcher(None, str(name), c).ratio() for c in close]
    close = [c for c, r in zip(close, score) if r >= max(score, default=0) - 1e-9][:2]
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def unknown(kind: str, name, choices: Iterable) -> str:
    """One line: unknown <kind> 'name' (did you mean ...?); known: a, b, c."""
    choices = [str(c) for c in choices]
    return f"unknown {kind} '{name}'{did_you_mean(name, choices)}; known: {', '.join(choices) or 'none'}"


def check(kind: str, names: Iterable, choices: Iterable) -> None:
    """ValueError naming every name not among choices."""
    choices = list(choices)
    bad = [n for n in names if n not in choices]
    if bad:
        raise ValueError("; ".join(unknown(kind, n, choices) for n in bad))
