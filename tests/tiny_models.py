"""Tiny random-weight causal LMs (Llama, Qwen2, Mistral) and LLaVA-1.5 for engine tests.

No downloads: every model is built from a config, fp32, eval mode, CPU-fast. Each builder returns
``(model, inputs)`` with ``inputs`` shaped like a processor's output (``input_ids``, ``attention_mask``,
and for LLaVA ``pixel_values`` with the ``<image>`` placeholders expanded in ``input_ids``).

Random transformers give near-uniform logits (near ties make greedy comparisons fragile), so the
token embeddings and the lm_head are re-drawn with a large std (``tiny_vlms.LOGIT_STD``): argmaxes are well
separated and exact-match checks are not decided by float rounding; the decoders are drawn with std 0.12
(``initializer_range``; LLaVA's with ``tiny_vlms.strengthen``) so that the output depends on the context and the
pixels, not on the last token alone.

Drafts for a target: ``same_draft`` (the target's weights: everything is accepted),
``correlated_draft`` (from tests/tiny_vlms.py: weights + noise, agrees often), ``contrary_draft``
(negated lm_head: its top-k never holds the target's argmax), and every builder's ``small=True``
(a smaller config with the same vocabulary and special tokens, its own random weights).
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tiny_vlms import correlated_draft  # noqa: F401  (re-exported: the same recipe for every family)
from tiny_vlms import finish, strengthen, text_config_kwargs

VOCAB_SIZE = 96
EOS_TOKEN_ID = 95
IMAGE_TOKEN_ID = 94
TEXT_VOCAB = 90  # prompt tokens are drawn below this


def _text_kwargs(small: bool, vocab_size: int) -> dict:
    # initializer_range 0.12: with HF's 0.02 the tiny decoder barely moves the residual stream and greedy output
    # follows the last token alone, blind to the context (test_families_more::test_every_tiny_model_reads_its_context)
    return text_config_kwargs(small, vocab_size=vocab_size, eos_token_id=EOS_TOKEN_ID, bos_token_id=1,
                              max_position_embeddings=512, attn_implementation="sdpa", initializer_range=0.12)


def _finish(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    return finish(model, seed=10_000 + seed)


def text_prompt(length: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, TEXT_VOCAB, (1, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def tiny_llama(seed: int = 0, small: bool = False, prompt_len: int = 12, vocab_size: int = VOCAB_SIZE):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**_text_kwargs(small, vocab_size)))
    return _finish(model, seed), text_prompt(prompt_len, seed)


def tiny_qwen2(seed: int = 0, small: bool = False, prompt_len: int = 12, vocab_size: int = VOCAB_SIZE):
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**_text_kwargs(small, vocab_size), use_sliding_window=False))
    return _finish(model, seed), text_prompt(prompt_len, seed)


def tiny_mistral(seed: int = 0, small: bool = False, prompt_len: int = 12, vocab_size: int = VOCAB_SIZE):
    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**_text_kwargs(small, vocab_size), sliding_window=None))
    return _finish(model, seed), text_prompt(prompt_len, seed)


def tiny_llava(seed: int = 0, small: bool = False, prompt_len: int = 12, vocab_size: int = VOCAB_SIZE):
    """LLaVA-1.5 layout: CLIP tower (16x16 px, 4 px patches → 16 features after dropping CLS), 2-layer
    MLP projector, Llama decoder; prompt = text, 16 ``<image>`` placeholders, text."""
    text = _text_kwargs(small, vocab_size)
    text.pop("attn_implementation")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, projection_dim=32)
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    config.eos_token_id = EOS_TOKEN_ID
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    # strengthened (the decoder reads pixels and context); the seed is picked so that the default prompt's greedy
    # output runs 40 tokens without EOS or a loop (tests count the new tokens)
    model = strengthen(_finish(model, seed), seed=4323 + seed)
    generator = torch.Generator().manual_seed(seed)
    prefix_len = max(prompt_len // 2, 1)
    prefix = torch.randint(2, TEXT_VOCAB, (prefix_len,), generator=generator).tolist()
    question = torch.randint(2, TEXT_VOCAB, (max(prompt_len - prefix_len, 1),), generator=generator).tolist()
    input_ids = torch.tensor([prefix + [IMAGE_TOKEN_ID] * 16 + question])
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(1, 3, 16, 16, generator=generator),
    }
    return model, inputs


TINY_MODEL_BUILDERS = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
    "llava": tiny_llava,
}


def same_draft(target: torch.nn.Module) -> torch.nn.Module:
    """A separate copy of the target (identical predictions)."""
    return copy.deepcopy(target).eval()


def contrary_draft(target: torch.nn.Module) -> torch.nn.Module:
    """A copy with the lm_head negated: its most likely tokens are the target's least likely ones."""
    draft = copy.deepcopy(target)
    with torch.no_grad():
        head = draft.get_output_embeddings()
        head.weight = torch.nn.Parameter(-head.weight.detach().clone())
    return draft.eval()


def tokens_left(stats, max_new_tokens: int) -> list[int]:
    """Per step of a generation's ``stats``: the tokens still to generate when it began (the prefill gives the
    first). A step with r left drafts at most r - 1 levels; with one left it is the target's alone (no tree)."""
    left, generated = [], 1
    for step in stats.steps:
        left.append(max_new_tokens - generated)
        generated += step.emitted
    return left


def tiny_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A word-level tokenizer over the tiny vocabulary: id i is the single printable character
    ``chr(33 + i)`` (ids up to 93), then ``<image>`` and ``</s>`` (EOS). Built offline."""
    from tokenizers import Regex, Tokenizer
    from tokenizers.decoders import Fuse
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(33 + i): i for i in range(min(vocab_size, 94))}
    vocab["<image>"] = IMAGE_TOKEN_ID
    vocab["</s>"] = EOS_TOKEN_ID
    backend = Tokenizer(WordLevel(vocab, unk_token="</s>"))
    backend.pre_tokenizer = Split(Regex("."), behavior="isolated")  # one character = one token
    backend.decoder = Fuse()  # decode concatenates the characters, no spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="</s>")


def all_family_builders() -> dict:
    """Every tiny family the engine supports: these causal LMs + LLaVA and the VLMs of tests/tiny_vlms.py."""
    from tiny_vlms import TINY_VLM_BUILDERS

    return {**TINY_MODEL_BUILDERS, **TINY_VLM_BUILDERS}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run a test module with one intra-op thread: these models are tiny, and on a shared machine torch's
    thread pool spends more time waiting than computing. Autouse: importing it into a test module applies it
    to that module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
