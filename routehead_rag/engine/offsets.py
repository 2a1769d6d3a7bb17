"""Where a passage's scored tokens lie in the caller's own text: character offsets, never re-derived by hand.

A passage reaches the prompt as ``cut_words`` leaves it (whitespace normalised: one space between the
words of a line, one ``"\\n"`` between lines, empty lines dropped; cut to ``max_passage_words``), with
lone surrogates replaced (``encodable``, one character for one), tokenised and cut to the passage budget
(:meth:`~routehead_rag.engine.prompt.PromptBuilder.cut_passage_counted`). Here that same text is built
again with a record of where each of its words starts in the caller's text, tokenised with the fast
tokenizer's offset mapping, and checked token for token against the ids the prompt held, so every
offset indexes the caller's string as given (Unicode, line breaks, a cut passage included).

Tokens are then joined into *spans* a reader sees as units: a word, the pieces of one character (a
byte-level tokenizer splits an emoji or a CJK character into several tokens with the same offsets), or
one token of a script written without spaces.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from .prompt import PromptBuilder, encodable

_WORD = re.compile(r"\S+")  # str.isspace()'s whitespace, as str.split() and cut_words use


@dataclass(frozen=True)
class ScoredText:
    """The token spans of one passage as the prompt read it, in the caller's text."""

    tokens: list[tuple[int, int] | None]  # per scored token: [start, end) in the caller's text; None: whitespace only
    scored_end: int | None  # where reading stopped when the passage was cut (None: read whole)


def cut_words_mapped(text: str, max_words: int | None) -> tuple[str, list[int], list[int]]:
    """``cut_words(text, max_words)``, and for each kept word its start there and in ``text`` (two sorted lists).

    The same rule as :func:`~routehead_rag.engine.prompt.cut_words` (words are ``str.split()``'s, lines are
    ``str.splitlines()``'s); the caller checks the result against the prompt's own token ids."""
    pieces: list[str] = []
    kept_starts: list[int] = []
    text_starts: list[int] = []
    length, budget, position = 0, max_words, 0
    for line in text.splitlines(keepends=True):
        words = [(m.start() + position, m.group()) for m in _WORD.finditer(line)]
        position += len(line)
        if budget is not None:
            words = words[:budget]
            budget -= len(words)
        for number, (start, word) in enumerate(words):
            if pieces:
                pieces.append(" " if number else "\n")
                length += 1
            kept_starts.append(length)
            text_starts.append(start)
            pieces.append(word)
            length += len(word)
        if budget == 0:
            break
    return "".join(pieces), kept_starts, text_starts


def scored_tokens(builder: PromptBuilder, text: str, count: int) -> ScoredText:
    """The caller's-text span of each of the first ``count`` tokens the prompt holds for passage ``text``.

    Raises ``ValueError`` for a slow tokenizer (no offsets), ``RuntimeError`` if the tokens found here are
    not those the prompt held (a bug: nothing is guessed)."""
    tokenizer = builder.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"attended spans need a fast tokenizer (offset mapping); {type(tokenizer).__name__} is not "
                         "one: pass attended=0 to explain without them")
    kept, kept_starts, text_starts = cut_words_mapped(text, builder.config.max_passage_words)
    encoded = tokenizer(encodable(kept), add_special_tokens=False, return_offsets_mapping=True)
    held = builder.cut_passage(text)  # the ids the prompt held (a window may have kept fewer: count)
    if count > len(held) or list(encoded["input_ids"][:count]) != held[:count]:
        raise RuntimeError(f"explain found other tokens than the prompt held for the passage {text[:40]!r}: "
                           "please report this bug")

    def caller(index: int) -> int:  # a character of a kept word -> its offset in `text`
        word = bisect.bisect_right(kept_starts, index) - 1
        return text_starts[word] + index - kept_starts[word]

    tokens: list[tuple[int, int] | None] = []
    for start, end in encoded["offset_mapping"][:count]:
        while start < end and kept[start].isspace():  # a byte-level token carries the space before its word
            start += 1
        while end > start and kept[end - 1].isspace():
            end -= 1
        tokens.append((caller(start), caller(end - 1) + 1) if start < end else None)
    whole = count == len(encoded["input_ids"]) and len(kept_starts) == len(_WORD.findall(text))
    ends = [span[1] for span in tokens if span is not None]
    return ScoredText(tokens, None if whole else (ends[-1] if ends else 0))


def _wide(character: str) -> bool:
    return unicodedata.east_asian_width(character) in ("W", "F")


def join_spans(text: str, tokens: Sequence[tuple[int, int] | None],
               weights: Sequence[float]) -> list[tuple[int, int, float]]:
    """``[(start, end, weight)]`` in text order: tokens joined into words (letters or digits running on across a
    token boundary) and into characters (tokens sharing one); a span's weight is its tokens' sum. A token of
    whitespace only is in no span; in scripts written without spaces (wide characters) a token is its own span."""
    spans: list[list] = []
    for span, weight in zip(tokens, weights):
        if span is None:
            continue
        start, end = span
        if spans and (start < spans[-1][1] or (start == spans[-1][1] and _joins(text[start - 1], text[start]))):
            spans[-1][1] = max(spans[-1][1], end)
            spans[-1][2] += weight
        else:
            spans.append([start, end, weight])
    return [(start, end, float(weight)) for start, end, weight in spans]


def _joins(before: str, after: str) -> bool:
    return before.isalnum() and after.isalnum() and not _wide(before) and not _wide(after)
