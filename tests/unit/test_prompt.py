"""Prompt layout: spans recorded while building are exact, order and cuts as configured."""

import pytest

from routehead_rag.engine.prompt import PromptBuilder, PromptConfig
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
    # no system turn by default, not even the template's default one (ICR's prompt)
    assert text.startswith("<|im_start|>user\nHere are some paragraphs:\n\n[1] ")
    with_system = PromptBuilder(builder.tokenizer, PromptConfig(system_prompt="Be brief.")).layout(PASSAGES)
    assert decode(builder.tokenizer, with_system.prefix_ids).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHere are some paragraphs:"
    )
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


def test_named_instructions():
    from routehead_rag.engine.prompt import QUESTION_INSTRUCTION, RELEVANCE_INSTRUCTION

    assert PromptConfig().with_instruction("question").task_instruction == QUESTION_INSTRUCTION
    assert PromptConfig(max_passage_words=50).with_instruction("relevance").max_passage_words == 50
    assert PromptConfig().task_instruction == RELEVANCE_INSTRUCTION
    with pytest.raises(ValueError, match="instruction must be one of"):
        PromptConfig().with_instruction("qa")


GEMMA_LIKE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
DEFAULT_SYSTEM_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|sys|>Default rules.<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize(
    "template, bos, expected_head, expected_tail",
    [
        (GEMMA_LIKE, "<|endoftext|>", "<|endoftext|><start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n"),
        (DEFAULT_SYSTEM_LIKE, "<|endoftext|>", "<|endoftext|><|user|>", "<|end|><|assistant|>"),
    ],
)
def test_template_split_keeps_bos_and_drops_default_system_turn(template, bos, expected_head, expected_tail):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    tokenizer.bos_token = bos
    start, head, tail = PromptBuilder(tokenizer)._split_chat_template()
    assert (start, head, tail) == ([], expected_head, expected_tail)
