"""The in-context re-ranking prompt and the token span of every passage and of the query part.

Layout (ICR's, wrapped in the backbone's chat template when it has one)::

    <template head> Here are some paragraphs:          \
    \n\n[1] <passage>                                   |  prefix: shared by the real
    \n\n[2] <passage>                                   |  and the content-free query,
    ...                                                 |  computed once (KV cache)
    \n\n                                                /
    Please find information ... paragraphs above.      \
    \n\nQuery: <query><template tail>                   /  query part (suffix)

Ids are built piece by piece and every span is recorded while they are built,
so spans are exact by construction; nothing is ever re-derived by tokenising
the whole prompt again.  The query part (every suffix token, as in ICR) is what
attends to the passages; the query text itself is never cut.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_SENTINEL = "\u2063ROUTEHEAD_USER_CONTENT\u2063"

RELEVANCE_INSTRUCTION = (
    "Please find information that are relevant to the following query in the paragraphs above."
)
"""ICR's 'IE' wording: for search queries (the default)."""
QUESTION_INSTRUCTION = "Please answer the following question based on the information in the paragraphs above."
"""ICR's 'QA' wording: for questions whose answer the passages hold (ICR uses it for multi-hop QA)."""
INSTRUCTIONS = {"relevance": RELEVANCE_INSTRUCTION, "question": QUESTION_INSTRUCTION}


class PromptConfig(BaseModel):
    """How the re-ranking prompt is laid out.  Every field is recorded with a fitted router."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    header: str = Field(
        "Here are some paragraphs:", description="instruction before the passages (ICR's wording)"
    )
    task_instruction: str = Field(
        RELEVANCE_INSTRUCTION,
        description="instruction after the passages: RELEVANCE_INSTRUCTION (ICR's 'IE', for search "
        "queries) or QUESTION_INSTRUCTION (ICR's 'QA', for questions), or your own",
    )
    query_label: str = Field("Query:", description="label the query text follows")
    separator: str = Field("\n\n", description="between header, passages and the query part")
    passage_order: Literal["rank1_nearest_query", "rank1_first"] = Field(
        "rank1_nearest_query",
        description="first-stage rank 1 placed last, next to the query (ICR found this best), or first",
    )
    max_passage_words: int | None = Field(
        None, ge=1, description="cut each passage to its first N words, line breaks kept (cut_words; None: no word cut)"
    )
    max_passage_tokens: int | None = Field(
        128, ge=1, description="the passage budget: cut each passage to its first N tokens of the model's tokenizer, "
        "after any word cut (None: no cut). 128 was chosen on fit dev data for quality and cost "
        "(benchmarks/results/passage_budget.md)"
    )
    use_chat_template: bool = Field(True, description="wrap the prompt as one user turn of the chat template")
    system_prompt: str | None = Field(
        None,
        description="None: no system turn, not even a template's default one (as ICR prompts); "
        "a string: that system message",
    )
    content_free_query: str = Field("N/A", min_length=1, description="content-free query used for calibration")

    def with_instruction(self, instruction: str) -> PromptConfig:
        """A copy in a named instruction's wording (``"relevance"`` or ``"question"``), all else kept.

        The one place an instruction name becomes its wording.
        """
        if not isinstance(instruction, str) or instruction not in INSTRUCTIONS:
            raise ValueError(f"instruction must be one of {sorted(INSTRUCTIONS)}, got {instruction!r}")
        return self.model_copy(update={"task_instruction": INSTRUCTIONS[instruction]})


_SURROGATES = re.compile("[\ud800-\udfff]")


def encodable(text: str) -> str:
    """``text`` with every lone surrogate (which UTF-8, and so no tokenizer, can encode) replaced by U+FFFD.

    Applied wherever text becomes token ids, so a stray surrogate in a passage, a query or a
    metadata value is scored as a replacement character instead of failing the whole call.
    """
    return _SURROGATES.sub("\ufffd", text) if _SURROGATES.search(text) else text


def cut_words(text: str, max_words: int | None) -> str:
    r"""Keep the first ``max_words`` whitespace-separated words of ``text``; the one word cut.

    The exact rule: a word is a maximal run of non-whitespace (what ``str.split()`` yields).
    Words are counted across lines; the first ``max_words`` are kept in order. Kept words on
    one line are joined by a single space, lines by a single ``"\n"``, and a line left without
    a kept word is dropped. So ``cut_words("Title\nA  b c", 2) == "Title\nA"`` and, always,
    ``cut_words(t, n).split() == t.split()[:n]``. ``max_words=None`` keeps every word
    (whitespace normalised the same way). Line breaks survive, so a passage built as
    ``title + "\n" + text`` (or Haystack's ``embedding_separator``) reaches the model as built.
    """
    if max_words is not None and max_words < 0:
        raise ValueError(f"max_words must be >= 0 or None, got {max_words}")
    budget = max_words
    lines: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if budget is not None:
            words = words[:budget]
            budget -= len(words)
        if words:
            lines.append(" ".join(words))
        if budget == 0:
            break
    return "\n".join(lines)


@dataclass(frozen=True)
class Span:
    """Half-open token range ``[start, end)`` in the full prompt."""

    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class QueryPart:
    """The suffix that follows the shared prefix, for one query (real or content-free)."""

    ids: list[int]
    span: Span  # the attending query part: all suffix tokens, in full-prompt positions
    text_span: Span  # the query text alone, in full-prompt positions


@dataclass(frozen=True)
class PromptLayout:
    """A prompt over a list of passages, ready for any query."""

    prefix_ids: list[int]
    passage_spans: list[Span]  # indexed by the caller's passage index (not by prompt position)
    prompt_order: list[int]  # prompt position -> caller's passage index
    passage_token_counts: list[int]  # tokens of each passage text as cut, by caller's index

    @property
    def prefix_length(self) -> int:
        return len(self.prefix_ids)


class PromptBuilder:
    """Builds token ids for the re-ranking prompt of one tokenizer and one :class:`PromptConfig`."""

    def __init__(self, tokenizer, config: PromptConfig | None = None):
        self.tokenizer = tokenizer
        self.config = config or PromptConfig()
        start_ids, template_head, self._template_tail = self._split_chat_template()
        self._head_ids = start_ids + self._encode(template_head + self.config.header)
        self._separator_ids = self._encode(self.config.separator)
        self._instruction_ids = self._encode(
            self.config.task_instruction + self.config.separator + self.config.query_label
        )
        self._tail_ids = self._encode(self._template_tail)

    # -- pieces --------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer.encode(encodable(text), add_special_tokens=False))

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _split_chat_template(self) -> tuple[list[int], str, str]:
        """(start ids, text before, text after) the user content of a one-turn chat with generation prompt."""
        tokenizer = self.tokenizer
        if self.config.use_chat_template and getattr(tokenizer, "chat_template", None):
            user = {"role": "user", "content": _SENTINEL}
            if self.config.system_prompt is not None:
                rendered = self._render([{"role": "system", "content": self.config.system_prompt}, user], True)
            else:
                rendered = self._render([user], True)
            if rendered.count(_SENTINEL) != 1:
                raise ValueError(
                    "the tokenizer's chat template does not place the user message verbatim; "
                    "pass PromptConfig(use_chat_template=False)"
                )
            head, tail = rendered.split(_SENTINEL)
            if self.config.system_prompt is None:
                head = self._without_system_turn(head)
            return [], head, tail
        # No template: start the way the tokenizer starts a sequence (BOS if it adds one).
        with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
        without = tokenizer("x", add_special_tokens=False)["input_ids"]
        start = with_special[: len(with_special) - len(without)] if with_special[-len(without) :] == without else []
        return list(start), "", ""

    def _without_system_turn(self, head: str) -> str:
        """Drop a default system turn a template inserts by itself, keeping the conversation's start token.

        The user-turn header is read off the template as the text a later user turn starts
        with (after one user/assistant exchange); whatever precedes it in ``head`` is a
        default system turn, except a leading BOS that is not itself the header's start.
        """
        exchange = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        try:
            before = self._render(exchange, False)
            after = self._render([*exchange, {"role": "user", "content": _SENTINEL}], True)
        except Exception:  # a template that refuses the exchange: keep its default
            return head
        if not after.startswith(before) or _SENTINEL not in after:
            return head
        user_header = after[len(before) : after.index(_SENTINEL)]
        if not user_header or not head.endswith(user_header):
            return head
        preamble = head[: len(head) - len(user_header)]
        bos = self.tokenizer.bos_token or ""
        keep = bos if bos and preamble.startswith(bos) and not user_header.startswith(bos) else ""
        return keep + user_header

    def cut_passage(self, text: str) -> list[int]:
        """Token ids of one passage after the word cut (:func:`cut_words`) and token cut (no ``[i]`` label)."""
        return self.cut_passage_counted(text)[0]

    def cut_passage_counted(self, text: str) -> tuple[list[int], int | None]:
        """:meth:`cut_passage`, and the passage's whole length in tokens when the budget cut it (else ``None``)."""
        words = cut_words(text, None)
        kept = cut_words(words, self.config.max_passage_words)
        ids = self._encode(kept)
        whole = None
        if kept != words:
            whole = len(self._encode(words))
        budget = self.config.max_passage_tokens
        if budget is not None and len(ids) > budget:
            whole = whole if whole is not None else len(ids)
            ids = ids[:budget]
        return ids, whole

    def split_passage(self, text: str, budget: int) -> list[tuple[int, int]]:
        """Character spans ``[(start, end), ...]`` of ``text`` that each hold at most ``budget`` tokens, in order and
        covering every token (chunk mode); one span for a text that fits. Needs a fast tokenizer (offsets).

        A span is counted as it is scored (:meth:`cut_passage_counted`: whitespace normalised, which can change
        the tokens at a chunk's edges), so no chunk is cut."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("chunk_long_documents needs a fast tokenizer (with offset mapping); this one is not")
        offsets = self.tokenizer(encodable(text), add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

        def fits(begin: int, end: int) -> bool:
            ids, whole = self.cut_passage_counted(text[begin:end])
            return whole is None and len(ids) <= budget

        spans: list[tuple[int, int]] = []
        start = begin = 0
        while True:
            stop = min(start + budget, len(offsets))
            end = len(text) if stop >= len(offsets) else offsets[stop][0]
            while stop > start + 1 and not fits(begin, end):  # a token fewer until it fits as scored
                stop -= 1
                end = offsets[stop][0]
            spans.append((begin, end))
            if stop >= len(offsets):
                return spans
            start, begin = stop, end

    def fixed_token_count(self, query: str) -> int:
        """Tokens of everything but the passages, for the longer of the real and content-free query."""
        longest = max((self.query_part(query, 0).ids, self.query_part(self.config.content_free_query, 0).ids), key=len)
        return len(self._head_ids) + len(longest)

    def passage_cost(self, passage_ids: list[int], position: int) -> int:
        """Tokens one passage adds at 1-based prompt position ``position`` (separator and label included)."""
        return len(self._separator_ids) + len(self._encode(f"[{position}] ")) + len(passage_ids)

    # -- prompt ----------------------------------------------------------------------
    def layout(self, passages: list[str], passage_ids: list[list[int]] | None = None) -> PromptLayout:
        """Lay out ``passages`` (given in first-stage order, best first) into the shared prefix."""
        if passage_ids is None:
            passage_ids = [self.cut_passage(text) for text in passages]
        n = len(passage_ids)
        order = list(range(n))
        if self.config.passage_order == "rank1_nearest_query":
            order.reverse()
        ids: list[int] = list(self._head_ids)
        spans: list[Span | None] = [None] * n
        for position, index in enumerate(order, start=1):
            ids += self._separator_ids
            start = len(ids)
            # "[i] " is part of the passage span, as in ICR.
            ids += self._encode(f"[{position}] ") + passage_ids[index]
            spans[index] = Span(start, len(ids))
        ids += self._separator_ids
        return PromptLayout(
            prefix_ids=ids,
            passage_spans=[span for span in spans if span is not None],
            prompt_order=order,
            passage_token_counts=[len(p) for p in passage_ids],
        )

    def query_part(self, query: str, prefix_length: int) -> QueryPart:
        """Suffix ids for ``query`` following a prefix of ``prefix_length`` tokens.  The query is never cut."""
        ids = list(self._instruction_ids)
        text_start = len(ids)
        ids += self._encode(" " + query.strip())
        text_end = len(ids)
        ids += self._tail_ids
        return QueryPart(
            ids=ids,
            span=Span(prefix_length, prefix_length + len(ids)),
            text_span=Span(prefix_length + text_start, prefix_length + text_end),
        )
