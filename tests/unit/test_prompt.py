"""Prompt layout: spans recorded while building are exact, order and cuts as configured."""

import pytest

from routehead_rag.prompt import PromptBuilder, PromptConfig
from tests.tiny_models import tiny_tokenizer

PASSAGES = ["the moon pulls the sea", "stock prices fell on monday", "two teams of five players"]


@pytest.fixture
def builder():
    return PromptBuilder(tiny_tokenizer())


def decode(tokenizer, ids):
    return tokenizer.decode(ids)


def test_passage_spans_hold_exactly_their_passage(builder):
    layout = builder.layout(PASSAGES)
    tokenizer = builder.tokenizer
    for index, text in enumerate(PASSAGES):
        span = layout.passage_spans[index]
        position = layout.prompt_order.index(index) + 1
        assert decode(tokenizer, layout.prefix_ids[span.start : span.end]) == f"[{position}] {text}"


def test_rank1_is_nearest_the_query_by_default(builder):
    layout = builder.layout(PASSAGES)
    assert layout.prompt_order == [2, 1, 0]
    starts = [span.start for span in layout.passage_spans]
    assert starts[0] > starts[1] > starts[2]  # first-stage rank 1 is last in the prompt
    first = PromptBuilder(builder.tokenizer, PromptConfig(passage_order="rank1_first")).layout(PASSAGES)
    assert first.prompt_order == [0, 1, 2]


def test_query_part_follows_prefix_and_query_is_never_cut(builder):
    layout = builder.layout(PASSAGES)
    query = " ".join(["why"] * 300)  # far beyond the passage cut
    part = builder.query_part(query, layout.prefix_length)
    assert part.span.start == layout.prefix_length
    assert part.span.end == layout.prefix_length + len(part.ids)
    text_ids = part.ids[part.text_span.start - layout.prefix_length : part.text_span.end - layout.prefix_length]
    assert decode(builder.tokenizer, text_ids).strip() == query
    full = decode(builder.tokenizer, layout.prefix_ids + part.ids)
    assert full.endswith("<|im_start|>assistant\n")
    assert "Query: " + query in full


def test_chat_template_wraps_the_prompt(builder):
    layout = builder.layout(PASSAGES)
    text = decode(builder.tokenizer, layout.prefix_ids)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_end|>\n<|im_start|>user\nHere are some paragraphs:\n\n[1] " in text
    plain = PromptBuilder(builder.tokenizer, PromptConfig(use_chat_template=False)).layout(PASSAGES)
    assert decode(builder.tokenizer, plain.prefix_ids).startswith("Here are some paragraphs:")


def test_word_and_token_cuts():
    tokenizer = tiny_tokenizer()
    long_passage = " ".join(f"word{i}" for i in range(50))
    words = PromptBuilder(tokenizer, PromptConfig(max_passage_words=5)).cut_passage(long_passage)
    assert decode(tokenizer, words) == "word0 word1 word2 word3 word4"
    tokens = PromptBuilder(tokenizer, PromptConfig(max_passage_words=None, max_passage_tokens=7)).cut_passage(long_passage)
    assert len(tokens) == 7


def test_real_and_content_free_parts_share_the_prefix(builder):
    layout = builder.layout(PASSAGES)
    real = builder.query_part("what pulls the sea", layout.prefix_length)
    free = builder.query_part("N/A", layout.prefix_length)
    assert real.span.start == free.span.start == layout.prefix_length
    assert decode(builder.tokenizer, free.ids[free.text_span.start - layout.prefix_length : free.text_span.end - layout.prefix_length]).strip() == "N/A"


def test_config_rejects_unknown_fields():
    with pytest.raises(Exception, match="extra"):
        PromptConfig(pasage_order="rank1_first")
