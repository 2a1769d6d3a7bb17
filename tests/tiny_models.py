"""Tiny offline models for unit tests: a ChatML byte-level BPE tokenizer and random causal LMs.

Everything is built from code (no download) in well under a second. Each call returns a
fresh object, so a test may mutate what it gets without affecting other tests.

    tok = tiny_tokenizer()                      # ~500-token vocab, SmolLM2-like specials + chat template
    lm = tiny_causal_lm("gemma3", seed=1)       # llama | qwen2 | gemma3, GQA 4 heads / 2 kv heads
    bb = tiny_backbone("qwen2")                 # routehead_rag.model.backbone.Backbone around both
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from routehead_rag.model.backbone import Backbone, load_backbone

ARCHS = ("llama", "qwen2", "gemma3")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
TINY_VOCAB_SIZE = 500

# SmolLM2's template with a shorter default system prompt: one ChatML block per message,
# "<|im_start|>assistant\n" on add_generation_prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A few hundred words of plain English for the BPE trainer (retrieval-flavoured, with digits
# and punctuation so passages in tests tokenize into a realistic mix of merges and bytes).
_CORPUS = """
The quick brown fox jumps over the lazy dog. A search engine ranks documents for a query,
and a re-ranker reads the best candidates again to put the most relevant passage first.
Passage one describes the history of the city of Paris, the capital of France, which sits on
the river Seine. Passage two explains how photosynthesis turns sunlight, water and carbon
dioxide into sugar and oxygen inside the green leaves of plants. Passage three is about the
planet Mars, the fourth planet from the Sun, with its red dust, thin air and two small moons.
Question: what is the capital of France? Answer: Paris is the capital and largest city.
Question: how do plants make food? Answer: they use light to make sugar from water and air.
Large language models read text as tokens. Each layer has attention heads, and every head
decides which earlier tokens matter for the next one. Some heads copy, some heads look back at
the start of the prompt, and a few heads find the document that answers the question.
In 1969 two astronauts walked on the Moon while a third stayed in orbit around it for 21 hours.
The library opens at 9 and closes at 17; children under 12 must come with an adult.
Rain fell all night over the mountains, the rivers rose, and by morning the old bridge was gone.
She wrote the report, checked the numbers twice, and sent it to the team before lunch on Friday.
Water boils at 100 degrees at sea level, but at the top of a high mountain it boils at less.
The museum holds paintings, maps, coins and letters from many centuries and many countries.
Doctors say that sleep, food, water and walking every day keep the heart and the mind healthy.
Trains leave the central station every ten minutes; the last one departs just before midnight.
A good summary keeps the facts, drops the noise, and tells the reader why the result matters.
Which passage answers the question best? Read each one, compare them, and rank them in order.
"""


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per session; callers rebuild a fresh tokenizer from this JSON."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # no BOS, like SmolLM2
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknowns
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh ChatML tokenizer (~500 tokens) shaped like SmolLM2's: no BOS added,
    ``<|im_start|>`` / ``<|im_end|>`` / ``<|endoftext|>`` specials, eos = pad = ``<|im_end|>``."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def tiny_config(arch: str, **overrides: Any) -> Any:
    """Config of a tiny random causal LM: GQA (4 query heads, 2 KV heads), hidden 64.

    ``initializer_range=0.2`` (instead of 0.02, which gives near-uniform attention at this
    size) so random heads differ: some peaked, some spread. Override it (or anything else)
    through ``overrides``.
    """
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    tokenizer = tiny_tokenizer()
    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: 2 query heads per KV head
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        config_class = LlamaConfig
    elif arch == "qwen2":
        config_class = Qwen2Config
    elif arch == "gemma3":
        config_class = Gemma3TextConfig
        common.update(
            num_hidden_layers=3,
            head_dim=16,  # Gemma's default is 256
            query_pre_attn_scalar=16,  # scale by 1/sqrt(head_dim), like the released models
            sliding_window=16,  # short, so the sliding mask shows up in ~40-token prompts
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    else:
        raise ValueError(f"Unknown tiny architecture {arch!r}; use one of {ARCHS}.")
    common.update(overrides)
    return config_class(**common)


def tiny_causal_lm(arch: str = "llama", seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A fresh tiny random ``*ForCausalLM`` (sdpa attention, eval mode, float32, CPU)."""
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


def tiny_backbone(arch: str = "llama", seed: int = 0, **overrides: Any) -> Backbone:
    """A :class:`Backbone` sharing a fresh tiny model and tokenizer."""
    return load_backbone(model=tiny_causal_lm(arch, seed=seed, **overrides), tokenizer=tiny_tokenizer())
