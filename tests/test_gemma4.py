"""Gemma 4 beyond the family tables (tests/test_families_more.py, test_video.py, test_batch_split.py run its images and
video): an audio clip in the prompt is lossless for every tree policy, with and without draft-side pruning; a batch
holding audio is refused with the reason; ``mm_token_type_ids`` 3 (audio) is taken only by a model with an audio
tower; and the tiny model has the decoder features the family tests are meant to cover (per-layer head sizes,
per-layer input embeddings, KV-shared layers).
"""
from __future__ import annotations

import pytest
import torch
from test_batch_split import assemble, text_row
from test_engine import POLICIES
from tiny_gemma4 import AUDIO_TOKEN_ID, tiny_gemma4, tiny_gemma4_audio
from tiny_models import correlated_draft, one_thread  # noqa: F401  (one_thread: autouse fixture)

from sage_ext.engine import SpeculativeGenerator
from sage_ext.families.model_access import text_decoder

MAX_NEW = 24


@pytest.fixture(scope="module")
def audio_case():
    target, inputs = tiny_gemma4_audio()
    with torch.no_grad():
        reference = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    return target, inputs, correlated_draft(target, noise=0.1), reference


def test_the_audio_case_reads_its_audio(audio_case):
    target, inputs, _, reference = audio_case
    assert int((inputs["input_ids"] == AUDIO_TOKEN_ID).sum()) >= 8
    other = {**inputs, "input_features": torch.randn(inputs["input_features"].shape,
                                                     generator=torch.Generator().manual_seed(5))}
    with torch.no_grad():
        assert not torch.equal(target.generate(**other, do_sample=False, max_new_tokens=MAX_NEW), reference)


@pytest.mark.parametrize("prune", [0.0, 0.5])
@pytest.mark.parametrize("policy", ["chain", "static", "dynamic", "sage", "sage_cost"])
def test_audio_prompt_is_lossless(audio_case, policy, prune):
    target, inputs, draft, reference = audio_case
    out = SpeculativeGenerator(target, draft, POLICIES[policy](), draft_prune_ratio=prune).generate(
        **inputs, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, reference)


def test_a_batch_with_audio_is_refused(audio_case):
    target, inputs, draft, _ = audio_case
    batch = assemble([inputs, text_row(6, 1, "mm_token_type_ids")])
    with pytest.raises(ValueError, match="decode prompts with audio one per call"):
        SpeculativeGenerator(target, draft, "sage_cost").generate(**batch, max_new_tokens=4)


def test_audio_token_types_are_refused_without_an_audio_tower():
    target, inputs = tiny_gemma4(small=True)
    types = inputs["mm_token_type_ids"].clone()
    types[0, 0] = 3
    with pytest.raises(ValueError, match=r"holds \[3\]: its values are 0 \(text\), 1 \(image\) and 2 \(video\)"):
        SpeculativeGenerator(target, None, "ar").generate(**{**inputs, "mm_token_type_ids": types}, max_new_tokens=3)


def test_the_tiny_decoder_has_the_features_under_test():
    target, _ = tiny_gemma4()
    attentions = [layer.self_attn for layer in text_decoder(target).layers]
    assert {attention.head_dim for attention in attentions} == {16, 32}
    assert [attention.is_kv_shared_layer for attention in attentions] == [False, False, True, True]
    assert target.config.text_config.hidden_size_per_layer_input > 0
