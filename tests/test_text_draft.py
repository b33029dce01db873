"""A text-only causal LM drafting for a vision-language target (e.g. Gemma-3-1B for Gemma 3, Qwen2.5-0.5B for
Qwen2.5-VL): the draft reads the prompt's text tokens alone, at consecutive positions, and never the media.

Every vision-language family: greedy output identical to ``target.generate`` for every policy, the target's cache
equal to a recomputation after every step, and the draft's equal to what the draft's OWN forward (HF's default
positions 0, 1, ...) gives for the prompt's text tokens followed by the generated ones: what a user running the
text model on that text would get. Batches, video, the refusals that stay, the vocabulary rule.
"""
from __future__ import annotations

import copy

import pytest
import torch
from test_engine import POLICIES
from test_engine_kv import MAX_NEW, assert_same_cache, recomputed_cache
from tiny_models import TINY_MODEL_BUILDERS, one_thread  # noqa: F401  (autouse fixture)
from tiny_vlms_more import ALL_VLM_BUILDERS
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from sage_ext.engine import SpeculativeGenerator
from sage_ext.families import get_adapter
from sage_ext.families.model_access import cache_kwarg, text_decoder

VLM_BUILDERS = {"llava": TINY_MODEL_BUILDERS["llava"], **ALL_VLM_BUILDERS}
# the causal-LM model type of a vision-language decoder that has no causal-LM class of its own
CAUSAL_LM_TYPES = {"qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2", "qwen3_vl_text": "qwen3",
                   "qwen3_vl_moe_text": "qwen3_moe", "glm4v_text": "glm4", "glm4v_moe_text": "glm4_moe"}


def text_draft_of(target: torch.nn.Module, noise: float = 0.1, seed: int = 1, vocab_size: int | None = None):
    """A text-only causal LM built from ``target``'s decoder config, with the decoder's and head's weights plus
    ``noise * std(w) * N(0, 1)`` per tensor (so it agrees with the target often, not always). ``vocab_size``: a
    smaller vocabulary (the head's and the embeddings' first rows), as a text model's is beside its VLM's."""
    text_config = target.config.get_text_config(decoder=True)
    causal_type = CAUSAL_LM_TYPES.get(text_config.model_type)
    if causal_type is None:
        config = copy.deepcopy(text_config)
    else:  # the same decoder with 1-D rope (M-RoPE sections dropped)
        fields = {key: value for key, value in text_config.to_dict().items()
                  if key not in ("model_type", "rope_scaling", "rope_parameters", "architectures")}
        fields.setdefault("head_dim", text_config.hidden_size // text_config.num_attention_heads)
        rope = dict(getattr(text_config, "rope_parameters", None) or {})
        rope.pop("mrope_section", None)
        config = AutoConfig.for_model(causal_type, **fields, **({"rope_parameters": rope} if rope else {}))
    if getattr(config, "use_bidirectional_attention", False):  # PaliGemma's decoder reads its prefix both ways
        config.use_bidirectional_attention = False
    if vocab_size is not None:
        config.vocab_size = vocab_size
    config.tie_word_embeddings = False
    draft = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        source = text_decoder(target).state_dict()
        own = draft.model.state_dict()
        for name, value in own.items():
            if name in source and source[name].shape[1:] == value.shape[1:] and source[name].shape[0] >= value.shape[0]:
                value.copy_(source[name][: value.shape[0]])
        head = target.get_output_embeddings().weight
        draft.get_output_embeddings().weight.copy_(head[: draft.get_output_embeddings().weight.shape[0]])
        generator = torch.Generator().manual_seed(seed)
        for param in draft.parameters():
            scale = param.std() if param.numel() > 1 else param.abs()
            param.add_(torch.randn(param.shape, generator=generator) * noise * scale)
    draft.generation_config.eos_token_id = target.generation_config.eos_token_id
    return draft.eval()


def text_tokens(target, inputs) -> torch.Tensor:
    """The prompt's tokens a text draft reads: all but the target's image/video placeholders."""
    visual = get_adapter(target).visual_token_mask(inputs)
    return inputs["input_ids"][:, ~visual[0]]


def draft_own_cache(draft, text_ids: torch.Tensor, generated: list[int]) -> DynamicCache:
    """The draft's cache from its own forward (HF's default positions) over the text and the generated tokens."""
    cache = DynamicCache()
    ids = torch.cat([text_ids, torch.tensor([generated], dtype=torch.int64)], dim=1) if generated else text_ids
    with torch.no_grad():
        draft(input_ids=ids, **{cache_kwarg(draft): cache}, use_cache=True)
    return cache


def run_checked(target, draft, inputs, policy, **kwargs):
    """One generation checking both caches after every step; returns the output and each step's tau."""
    generator = SpeculativeGenerator(target, draft, policy, **kwargs)
    assert generator.text_draft
    prompt_len = inputs["input_ids"].shape[1]
    text_ids = text_tokens(target, inputs)
    taus = []

    def check(info):
        taus.append(info.tau)
        if info.finished:
            return
        sequence = info.sequence
        assert_same_cache(info.target_cache, recomputed_cache(target, inputs, sequence, len(sequence) - 1))
        assert torch.equal(info.draft_keep[0], ~get_adapter(target).visual_token_mask(inputs)[0])
        expected = draft_own_cache(draft, text_ids, sequence[prompt_len:info.draft_done])
        assert_same_cache(info.draft_cache, expected)

    generator.step_hook = check
    out = generator.generate(**inputs, max_new_tokens=MAX_NEW)
    assert len(taus) == out.stats.target_forwards > 0
    return out, taus


@pytest.fixture(scope="module", params=list(VLM_BUILDERS))
def vlm_pair(request):
    target, inputs = VLM_BUILDERS[request.param]()
    assert get_adapter(target).visual_token_mask(inputs).any()
    return target, inputs, text_draft_of(target)


@pytest.mark.parametrize("policy", ["chain", "static", "dynamic", "sage", "sage_cost"])
def test_text_draft_is_lossless_and_reads_the_text_alone(vlm_pair, policy):
    target, inputs, draft = vlm_pair
    out, taus = run_checked(target, draft, inputs, POLICIES[policy]())
    with torch.no_grad():
        reference = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, reference)
    if policy == "dynamic":  # the draft's weights are the target's decoder's: EAGLE-2's 64-node tree holds the
        # target's token at times (a chain or a narrower tree may miss at every step where the target's tokens follow
        # the image, which the draft never sees)
        assert max(taus) > 0


def test_text_draft_accepts_like_the_decoder_it_copies():
    """A draft whose weights are exactly the target's decoder's, on a prompt without media, predicts what the target
    predicts: every draft token is accepted, so positions and prompt are the text model's own."""
    target, inputs = TINY_MODEL_BUILDERS["llava"]()
    draft = text_draft_of(target, noise=0.0)
    text_only = {"input_ids": text_tokens(target, inputs)}
    text_only["attention_mask"] = torch.ones_like(text_only["input_ids"])
    out = SpeculativeGenerator(target, draft, POLICIES["chain"]()).generate(**text_only, max_new_tokens=MAX_NEW,
                                                                          eos_token_id=-1)
    records = out.stats.steps[:-1]  # the last step may be cut by max_new_tokens
    assert records and all(record.tau == record.tree_depth == 5 for record in records)
    # the same draft with the image in the target's prompt: the text the draft reads is the same, its predictions
    # now only sometimes the target's (which sees the image)
    with_image = SpeculativeGenerator(target, draft, POLICIES["chain"]()).generate(**inputs, max_new_tokens=MAX_NEW)
    with torch.no_grad():
        reference = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    assert torch.equal(with_image.sequences, reference)


@pytest.mark.parametrize("case", ["qwen2_5_vl-image-and-video", "qwen3_vl-image-and-video", "llava_onevision-video"])
def test_text_draft_with_a_video(case):
    from test_video import CASES

    target, inputs = CASES[case][0]()
    draft = text_draft_of(target)
    out, _ = run_checked(target, draft, inputs, POLICIES["sage"]())
    with torch.no_grad():
        reference = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, reference)


def test_text_draft_in_a_batch():
    """A batch of a prompt with an image and one without: each row as alone, each row's draft reading its text."""
    target, with_image = TINY_MODEL_BUILDERS["llava"](seed=0)
    draft = text_draft_of(target)
    text_ids = torch.randint(2, 90, (1, 9), generator=torch.Generator().manual_seed(3))
    length = with_image["input_ids"].shape[1]
    padded = torch.cat([torch.zeros(1, length - 9, dtype=torch.int64), text_ids], dim=1)
    batch = {"input_ids": torch.cat([with_image["input_ids"], padded]),
             "attention_mask": torch.cat([with_image["attention_mask"],
                                          (torch.arange(length) >= length - 9).long()[None]]),
             "pixel_values": with_image["pixel_values"]}
    generator = SpeculativeGenerator(target, draft, "sage")
    out = generator.generate(**batch, max_new_tokens=MAX_NEW)
    for row, alone in enumerate([with_image, {"input_ids": text_ids, "attention_mask": torch.ones_like(text_ids)}]):
        with torch.no_grad():
            reference = target.generate(**alone, do_sample=False, max_new_tokens=MAX_NEW)[0, alone["input_ids"].shape[1]:]
        produced = out.sequences[row, length:length + reference.shape[0]]
        assert torch.equal(produced, reference)


def test_a_prompt_of_media_alone():
    """A prompt of image placeholders only gives the text draft its last token (it cannot start from nothing)."""
    target, inputs = TINY_MODEL_BUILDERS["llava"]()
    visual = get_adapter(target).visual_token_mask(inputs)[0]
    only_media = {"input_ids": inputs["input_ids"][:, visual], "pixel_values": inputs["pixel_values"]}
    only_media["attention_mask"] = torch.ones_like(only_media["input_ids"])
    draft = text_draft_of(target)
    out = SpeculativeGenerator(target, draft, "sage").generate(**only_media, max_new_tokens=MAX_NEW)
    with torch.no_grad():
        reference = target.generate(**only_media, do_sample=False, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, reference)


def test_special_tokens_beyond_the_text_vocabulary():
    """As LLaVA-1.5 (image token 32000, pad 32001) beside a 32000-token Llama, or SmolVLM (EOS 49279) beside
    SmolLM2's 49152 tokens: the target's media placeholder, pad and even EOS past a text draft's vocabulary do not
    matter to it (it never reads media or padding; an EOS it lacks only means it never proposes the end), and the
    output is the target's; a vision-language draft of that vocabulary is refused as before (its special ids named),
    and so is any draft beyond max_vocab_padding."""
    target, inputs = TINY_MODEL_BUILDERS["llava"](vocab_size=128)
    image_id = 120
    inputs = dict(inputs, input_ids=torch.where(inputs["input_ids"] == 94, image_id, inputs["input_ids"]))
    target.config.image_token_id = image_id
    draft = text_draft_of(target, vocab_size=112)
    out = SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=MAX_NEW)
    with torch.no_grad():
        reference = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, reference)
    target.config.pad_token_id = 121
    without_eos = text_draft_of(target, vocab_size=90)  # EOS 95 and pad 121 outside it too
    # a prompt of text alone: the target reads what the draft reads, so the draft's tokens get accepted
    text_only = {"input_ids": text_tokens(target, inputs)}
    for policy in ("sage", "chain"):
        out = SpeculativeGenerator(target, without_eos, policy).generate(**text_only, max_new_tokens=40)
        with torch.no_grad():
            reference = target.generate(**text_only, do_sample=False, max_new_tokens=40)
        assert torch.equal(out.sequences, reference)
        assert out.stats.mean_tau > 0
    small_vlm, _ = TINY_MODEL_BUILDERS["llava"](vocab_size=112)
    small_vlm.config.image_token_id = 100
    with pytest.raises(ValueError, match=r"special token id\(s\) \[120, 121\]"):
        SpeculativeGenerator(target, small_vlm, "sage")
    with pytest.raises(ValueError, match="only padding rows may differ \\(at most max_vocab_padding=8\\)"):
        SpeculativeGenerator(target, draft, "sage", max_vocab_padding=8)


def test_pairs_that_stay_refused():
    """A vision-language draft of another family; a text target's text draft is an ordinary draft."""
    llava, _ = TINY_MODEL_BUILDERS["llava"]()
    qwen2_vl, _ = VLM_BUILDERS["qwen2_vl"]()
    with pytest.raises(ValueError, match="same model family"):
        SpeculativeGenerator(llava, qwen2_vl, "sage")
    llama, _ = TINY_MODEL_BUILDERS["llama"]()
    assert not SpeculativeGenerator(llama, TINY_MODEL_BUILDERS["llama"](seed=1)[0], "sage").text_draft


def test_sampling_with_a_text_draft_is_seeded_and_top_k_1_is_greedy():
    target, inputs = VLM_BUILDERS["qwen2_vl"]()
    draft = text_draft_of(target)
    generator = SpeculativeGenerator(target, draft, "sage")
    runs = [generator.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=True, temperature=0.8,
                               generator=torch.Generator().manual_seed(5)).sequences for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    greedy = generator.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=True, top_k=1).sequences
    with torch.no_grad():
        reference = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    assert torch.equal(greedy, reference)


def test_captured_text_draft():
    """capture_draft=True with a text draft (its tree forwards compiled with static shapes): lossless, caches as
    above."""
    target, inputs = VLM_BUILDERS["qwen2_5_vl"]()
    draft = text_draft_of(target)
    out, taus = run_checked(target, draft, inputs, POLICIES["sage"](), capture_draft=True)
    with torch.no_grad():
        reference = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, reference)
    assert max(taus) > 0


def test_text_draft_through_transformers_generate():
    """``target.generate(custom_generate=sage_ext's folder, assistant_model=text_lm)`` and ``sage_ext.generate``."""
    import sage_ext

    target, inputs = VLM_BUILDERS["gemma3"]()
    draft = text_draft_of(target)
    with torch.no_grad():
        reference = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
        through_hf = target.generate(**inputs, max_new_tokens=MAX_NEW, assistant_model=draft, do_sample=False,
                                     custom_generate=sage_ext.custom_generate_path(), trust_remote_code=True)
    assert torch.equal(through_hf, reference)
    sequences, stats = sage_ext.generate(target, draft, **inputs, max_new_tokens=MAX_NEW)
    assert torch.equal(sequences, reference) and stats.mean_tau > 0


def test_gemma3_text_draft_with_a_window_shorter_than_its_prompt():
    """Gemma-3-1B drafting for a Gemma 3 model (window 512 against prompts of any length): the draft's sliding window
    does not bound the prompt (tests/test_families_more.py::test_a_draft_window_shorter_than_the_prompt; its tree
    forwards attend past the window, so its cache is not its own forward's: only the output is checked)."""
    target, inputs = VLM_BUILDERS["gemma3"]()
    draft = text_draft_of(target)
    draft.config.sliding_window = 4
    assert get_adapter(draft).sliding_window() == 4 < text_tokens(target, inputs).shape[1]
    out = SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=MAX_NEW)
    with torch.no_grad():
        reference = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, reference)


@pytest.mark.parametrize("capture_draft", [False, True])
def test_a_text_draft_with_learned_absolute_positions(capture_draft):
    """GPT-2 (a table of absolute positions) drafting for Qwen2-VL, in a batch of three rows and, captured, alone:
    the padding slots of batched and shape-padded forwards sit below position 0 with a text draft's offset, and
    are floored there (``FamilyAdapter.rope_position_ids``; it raised inside torch.embedding)."""
    from test_batch_split import CASES, assemble
    from tiny_vlms_more import CAUSAL_LM_BUILDERS

    target, rows, layout = CASES["qwen2_vl"]()
    gpt2 = CAUSAL_LM_BUILDERS["gpt2"](seed=3)[0]
    generator = SpeculativeGenerator(target, gpt2, "sage", capture_draft=capture_draft)
    assert generator.text_draft
    prompts = rows[:1] if capture_draft else rows
    batch = prompts[0] if capture_draft else assemble(prompts, **layout)
    out = generator.generate(**batch, max_new_tokens=MAX_NEW, pad_token_id=2)
    length = batch["input_ids"].shape[1]
    for index, row in enumerate(prompts):
        with torch.no_grad():
            reference = target.generate(**row, do_sample=False, max_new_tokens=MAX_NEW)[0, row["input_ids"].shape[1]:]
        assert torch.equal(out.sequences[index, length:length + reference.shape[0]], reference)
