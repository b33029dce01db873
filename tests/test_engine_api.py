"""The engine's public surface: arguments, streamer, clear errors, vocabulary padding, the shortcut."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny_models import (  # noqa: F401  (one_thread: autouse fixture)
    EOS_TOKEN_ID,
    correlated_draft,
    one_thread,
    same_draft,
    tiny_llama,
    tiny_llava,
    tiny_mistral,
    tiny_qwen2,
    tiny_tokenizer,
)
from tiny_vlms import tiny_qwen2_vl
from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM, TextStreamer

from sage_ext.engine import GenerationOutput, SpeculativeGenerator, generate
from sage_ext.engine.policies import POLICIES, SagePolicy, make_policy


@pytest.fixture(scope="module")
def llama():
    target, inputs = tiny_llama()
    return target, inputs, correlated_draft(target, noise=0.1)


def hf_greedy(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, do_sample=False, **kwargs)


class RecordingStreamer:
    """Records what a TextStreamer-compatible streamer receives."""

    def __init__(self):
        self.puts: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def test_output_is_a_named_tuple_like_hf(llama):
    target, inputs, draft = llama
    out = SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=10)
    assert isinstance(out, GenerationOutput)
    sequences, stats = out
    assert sequences.dtype == torch.long and sequences.shape == (1, inputs["input_ids"].shape[1] + 10)
    assert stats is out.stats and stats.new_tokens == 10


def test_the_default_policy_is_the_cost_aware_sage(llama):
    """One rule for the default (policies.DEFAULT_POLICY), taken by the generator, the one-call API and the CLI."""
    from sage_ext.cli import build_parser
    from sage_ext.engine.policies import DEFAULT_POLICY, CostAwareSagePolicy

    target, inputs, draft = llama
    assert DEFAULT_POLICY == "sage_cost"
    generator = SpeculativeGenerator(target, draft)
    assert isinstance(generator.policy, CostAwareSagePolicy)
    sequences, stats = generate(target, draft, **inputs, max_new_tokens=10)
    assert stats.policy == "sage_cost"
    assert torch.equal(sequences, hf_greedy(target, inputs, max_new_tokens=10))
    parser = build_parser()
    assert parser.parse_args(["demo"]).policy == DEFAULT_POLICY
    assert parser.parse_args(["generate", "--image", "x.png", "--prompt", "p"]).policy == DEFAULT_POLICY


def test_streamer_gets_the_prompt_then_every_token(llama):
    target, inputs, draft = llama
    streamer = RecordingStreamer()
    out = SpeculativeGenerator(target, draft, "static").generate(**inputs, max_new_tokens=20, streamer=streamer)
    assert torch.equal(streamer.puts[0], inputs["input_ids"])
    streamed = torch.cat([value.reshape(-1) for value in streamer.puts[1:]])
    assert torch.equal(streamed, out.sequences[0, inputs["input_ids"].shape[1]:])
    assert len(streamer.puts) > 2 and streamer.ended == 1
    assert len(streamer.puts) - 1 < 20, "accepted blocks arrive together, not one token per put"


def test_hf_text_streamer_prints_the_generated_text(llama, capsys):
    target, inputs, draft = llama
    tokenizer = tiny_tokenizer()
    out = SpeculativeGenerator(target, draft, "sage").generate(
        **inputs, max_new_tokens=16, streamer=TextStreamer(tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.strip() == tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1]:]).strip()


def test_eos_from_generation_config_and_lists(llama):
    target, inputs, draft = llama
    prompt_len = inputs["input_ids"].shape[1]
    free = hf_greedy(target, inputs, max_new_tokens=24, eos_token_id=-1)[0, prompt_len:].tolist()
    eos_a, eos_b = free[9], free[5]
    reference = hf_greedy(target, inputs, max_new_tokens=24, eos_token_id=[eos_a, eos_b])
    out = SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=24, eos_token_id=[eos_a, eos_b])
    assert torch.equal(out.sequences, reference) and out.stats.stop_reason == "eos"
    # default: the target's generation_config (EOS_TOKEN_ID), same as HF
    default = SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=24)
    assert torch.equal(default.sequences, hf_greedy(target, inputs, max_new_tokens=24))
    assert target.generation_config.eos_token_id == EOS_TOKEN_ID


def test_one_call_shortcut(llama):
    target, inputs, draft = llama
    out = generate(target, draft, policy=SagePolicy(lag=False), max_new_tokens=12, **inputs)
    assert torch.equal(out.sequences, hf_greedy(target, inputs, max_new_tokens=12))


def test_autoregressive_policy_needs_no_draft(llama):
    target, inputs, _ = llama
    out = SpeculativeGenerator(target, None, "ar").generate(**inputs, max_new_tokens=12)
    assert torch.equal(out.sequences, hf_greedy(target, inputs, max_new_tokens=12))
    assert out.stats.target_forwards == 11


def test_policy_names_and_objects():
    assert sorted(POLICIES) == ["ar", "chain", "dynamic", "sage", "sage_cost", "static"]
    policy = SagePolicy(d_max=6)
    assert make_policy(policy) is policy
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("beam")


@pytest.mark.parametrize("target_vocab, draft_vocab", [(96, 128), (128, 96)])
def test_vocabularies_differing_by_padding_work(target_vocab, draft_vocab):
    target, inputs = tiny_qwen2(seed=2, vocab_size=target_vocab)
    draft, _ = tiny_qwen2(seed=2, vocab_size=draft_vocab)
    # same weights on the shared rows, so the draft agrees with the target often
    with torch.no_grad():
        shared = min(target_vocab, draft_vocab)
        for name, param in draft.named_parameters():
            source = dict(target.named_parameters())[name]
            if param.shape == source.shape:
                param.copy_(source)
            else:
                param[:shared].copy_(source[:shared])
    reference = hf_greedy(target, inputs, max_new_tokens=20)
    for policy in ("static", "sage", "dynamic"):
        out = SpeculativeGenerator(target, draft, policy).generate(**inputs, max_new_tokens=20)
        assert torch.equal(out.sequences, reference)
        assert out.stats.mean_tau > 0


def test_vocabulary_mismatch_beyond_padding_is_rejected():
    target, _ = tiny_llama(vocab_size=96)
    draft, _ = tiny_llama(vocab_size=512)
    with pytest.raises(ValueError, match="vocabularies differ"):
        SpeculativeGenerator(target, draft, "sage")


def test_special_token_outside_the_shared_vocabulary_is_rejected():
    target, _ = tiny_llama(vocab_size=96)  # EOS 95
    draft, _ = tiny_llama(vocab_size=64)
    draft.generation_config.eos_token_id = EOS_TOKEN_ID
    with pytest.raises(ValueError, match="special token"):
        SpeculativeGenerator(target, draft, "sage")


def test_a_draft_whose_generation_config_names_other_eos_ids(llama):
    """The generation stops on the target's EOS ids (as generate); the draft's config (a base checkpoint drafting
    for an instruct one names other ids) is not read, and the output is the target's."""
    target, inputs, _ = llama
    draft = same_draft(target)
    draft.generation_config.eos_token_id = 3
    prompt_len = inputs["input_ids"].shape[1]
    eos = int(hf_greedy(target, inputs, max_new_tokens=24, eos_token_id=-1)[0, prompt_len + 4])
    target.generation_config.eos_token_id, old = [eos, 7], target.generation_config.eos_token_id
    try:
        out = SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=24)
        assert torch.equal(out.sequences, hf_greedy(target, inputs, max_new_tokens=24))
    finally:
        target.generation_config.eos_token_id = old
    assert out.stats.stop_reason == "eos"


@pytest.mark.parametrize("builder, change, fragment", [
    (tiny_qwen2_vl, lambda config: setattr(config.vision_config, "patch_size", 8), "vision_config.patch_size 4 vs 8"),
    (tiny_qwen2_vl, lambda config: setattr(config.vision_config, "spatial_merge_size", 1),
     "vision_config.spatial_merge_size 2 vs 1"),
    (tiny_qwen2_vl, lambda config: setattr(config, "image_token_id", 3), r"image_token_id \d+ vs 3"),
    (tiny_llava, lambda config: setattr(config, "vision_feature_select_strategy", "full"),
     "vision_feature_select_strategy default vs full"),
])
def test_a_draft_that_reads_media_differently_is_rejected(builder, change, fragment):
    """The draft is given the processor outputs made for the target: a draft whose media tokens or vision geometry
    differ would fail inside transformers at its prefill (or read the wrong tokens), so the pair is refused up front."""
    target, _ = builder()
    draft = correlated_draft(target)
    change(draft.config)
    with pytest.raises(ValueError, match=f"read images/videos differently \\({fragment}"):
        SpeculativeGenerator(target, draft, "sage")


def test_different_families_are_rejected():
    """A vision-language draft of another family (a text-only draft of the target's tokenizer is accepted:
    tests/test_text_draft.py)."""
    target, _ = tiny_llava()
    draft, _ = tiny_qwen2_vl()
    with pytest.raises(ValueError, match="same model family"):
        SpeculativeGenerator(target, draft, "sage")


def test_unsupported_model_lists_the_supported_families():
    """GPT-2 is a causal LM the generic adapter serves; Mamba keeps a recurrent state and is refused."""
    assert SpeculativeGenerator(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=96)), None, "ar")
    model = MambaForCausalLM(MambaConfig(vocab_size=96, hidden_size=16, state_size=4, num_hidden_layers=1))
    with pytest.raises(ValueError, match="recurrent.*Supported: any decoder-only causal LM.*llama.*llava"):
        SpeculativeGenerator(model, None, "ar")


@pytest.mark.parametrize("which", ["target", "draft"])
def test_flash_attention_is_refused(which):
    target, _ = tiny_llava()
    draft = same_draft(target)
    model = target if which == "target" else draft
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        SpeculativeGenerator(target, draft, "sage")


@pytest.mark.parametrize("which", ["target", "draft"])
def test_attention_switched_after_construction_is_refused_at_generate(llama, which):
    """set_attn_implementation after the generator was built: the next generate refuses it as the constructor does
    (flex attention reached with the tree mask read out of bounds and could abort the process)."""
    target, inputs, _ = llama
    target, draft = copy.deepcopy(target), same_draft(target)
    generator = SpeculativeGenerator(target, draft, "sage")
    model = target if which == "target" else draft
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match="attn_implementation='flex_attention'.*attn_implementation='sdpa'"):
        generator.generate(**inputs, max_new_tokens=6)
    model.set_attn_implementation("sdpa")
    assert torch.equal(generator.generate(**inputs, max_new_tokens=6).sequences,
                       hf_greedy(target, inputs, max_new_tokens=6))


def test_dynamically_quantized_models():
    """int8 dynamic quantization (torch.ao, every Linear: the lm_head's weight is then a method). A quantized draft:
    the output is the target's. A quantized target quantizes each forward's input with one scale over its rows, so
    a tree verification is not generate's one-row forward: the constructor warns, the output can part from
    generate's (it does here: the negative control that the warning is not idle), and 'ar' stays exact."""
    target, inputs = tiny_llama(seed=0)
    draft = correlated_draft(target, noise=0.1)

    def int8(model):
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)

    quantized_draft = int8(draft)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = SpeculativeGenerator(target, quantized_draft, "sage").generate(**inputs, max_new_tokens=12)
    assert not [w for w in caught if "dynamically quantized" in str(w.message)]  # none for a quantized draft
    assert torch.equal(out.sequences, hf_greedy(target, inputs, max_new_tokens=12))
    quantized = int8(target)
    expected = hf_greedy(quantized, inputs, max_new_tokens=12)
    assert torch.equal(SpeculativeGenerator(quantized, None, "ar").generate(**inputs, max_new_tokens=12).sequences,
                       expected)
    for other in (draft, quantized_draft):
        with pytest.warns(UserWarning, match="dynamically quantized Linear layers"):
            generator = SpeculativeGenerator(quantized, other, "sage")
        out = generator.generate(**inputs, max_new_tokens=12)
        assert out.sequences.shape == expected.shape
        assert not torch.equal(out.sequences, expected)


def test_eager_attention_is_lossless():
    target, inputs = tiny_mistral()
    target.config._attn_implementation = "eager"
    draft = correlated_draft(target, noise=0.1)
    out = SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=16)
    assert torch.equal(out.sequences, hf_greedy(target, inputs, max_new_tokens=16))


def test_a_batch_of_copies_decodes_each_like_the_prompt_alone(llama):
    target, inputs, draft = llama
    batch = {key: value.repeat(2, 1) for key, value in inputs.items()}
    single = SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=8)
    out = SpeculativeGenerator(target, draft, "sage").generate(**batch, max_new_tokens=8)
    assert torch.equal(out.sequences, single.sequences.repeat(2, 1))
    assert [stats.new_tokens for stats in out.stats] == [8, 8]


def test_a_left_padded_prompt_decodes_as_the_prompt_without_its_padding(llama):
    target, inputs, draft = llama
    mask = inputs["attention_mask"].clone()
    mask[0, :2] = 0
    out = SpeculativeGenerator(target, draft, "sage").generate(**{**inputs, "attention_mask": mask},
                                                               max_new_tokens=8)
    alone = {key: value[:, 2:] for key, value in inputs.items()}
    expected = hf_greedy(target, alone, max_new_tokens=8)
    assert torch.equal(out.sequences[:, :2], inputs["input_ids"][:, :2])
    assert torch.equal(out.sequences[:, 2:], expected)


def test_right_padding_is_refused(llama):
    target, inputs, draft = llama
    mask = inputs["attention_mask"].clone()
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        SpeculativeGenerator(target, draft, "sage").generate(**{**inputs, "attention_mask": mask})


def test_stop_strings_need_a_tokenizer(llama):
    target, inputs, draft = llama
    with pytest.raises(ValueError, match="tokenizer"):
        SpeculativeGenerator(target, draft, "sage").generate(**inputs, stop_strings=["ab"])


def test_past_a_sliding_window_shorter_than_a_tree_is_refused():
    """Past the window (Mistral: every layer slides) trees run with the window mask (tests/test_families_more.py);
    a window no longer than the policy's deepest tree is refused, naming both."""
    target, inputs = tiny_mistral()
    target.config.sliding_window = 8
    with pytest.raises(ValueError, match=r"sliding-window attention \(window 8\).*not longer than a token tree"):
        SpeculativeGenerator(target, same_draft(target), "sage").generate(**inputs, max_new_tokens=64)


@pytest.mark.parametrize("ratio", [None, "0.5", True, -0.1, 1.5, float("nan")])
def test_a_draft_prune_ratio_that_is_not_a_fraction_is_refused(llama, ratio):
    target, _, draft = llama
    with pytest.raises(ValueError, match=r"draft_prune_ratio must be a number in \[0, 1\]"):
        SpeculativeGenerator(target, draft, "sage", draft_prune_ratio=ratio)


def test_policy_without_draft_is_refused(llama):
    target, _, _ = llama
    with pytest.raises(ValueError, match="needs a draft"):
        SpeculativeGenerator(target, None, "sage")


def test_models_are_left_as_they_were(llama):
    target, inputs, draft = llama
    before = copy.deepcopy(target.state_dict())
    config = target.config.to_dict()
    SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=8)
    assert target.config.to_dict() == config
    assert all(torch.equal(before[key], value) for key, value in target.state_dict().items())
