"""LLaVA (``model_type == "llava"``) with the vision towers real checkpoints use besides CLIP: SigLIP (no class token:
llava-interleave) and Pixtral (images of any size with ``image_sizes``: Pixtral-12B); and Mistral 3 (a Pixtral tower
whose patches are merged 2x2). The placeholders per image
follow the tower (``families.llava.llava_image_tokens``), for the input check and for splitting a batch alike, whatever
``config.image_seq_length`` says; every output equals ``target.generate``.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import EOS_TOKEN_ID, IMAGE_TOKEN_ID, TEXT_VOCAB, VOCAB_SIZE, correlated_draft, one_thread  # noqa: F401
from tiny_vlms import finish, text_config_kwargs
from tiny_vlms_more import pixtral_images, tiny_mistral3
from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig, PixtralVisionConfig, SiglipVisionConfig

import sage_ext

MAX_NEW = 20
BREAK, END = 92, 93  # Pixtral's row-break and image-end tokens (text tokens of the prompt)


def tiny_llava_with(tower: str, strategy: str = "full", seed: int = 0) -> torch.nn.Module:
    """A tiny LLaVA whose tower is SigLIP (16 px, 4 px patches: 16 tokens, 15 with "default") or Pixtral (8 px
    patches, any size); ``image_seq_length`` left at LlavaConfig's default (576), as configs built by hand have it."""
    if tower == "siglip":
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=16, patch_size=4, vision_use_head=False)
    else:
        vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=64, patch_size=8, head_dim=16)
    text = text_config_kwargs(False, vocab_size=VOCAB_SIZE, eos_token_id=EOS_TOKEN_ID, bos_token_id=1,
                              max_position_embeddings=512)
    config = LlavaConfig(vision_config=vision, text_config=MistralConfig(**text), image_token_index=IMAGE_TOKEN_ID,
                         vision_feature_layer=-1, vision_feature_select_strategy=strategy,
                         projector_hidden_act="gelu", tie_word_embeddings=False)
    config.eos_token_id = EOS_TOKEN_ID
    torch.manual_seed(seed)
    return finish(LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa"), seed=500 + seed)


def prompt(blocks: list[list[int]], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, TEXT_VOCAB, (3,), generator=generator).tolist()
    for block in blocks:
        ids += block + torch.randint(2, TEXT_VOCAB, (2,), generator=generator).tolist()
    return torch.tensor([ids + torch.randint(2, TEXT_VOCAB, (4 + seed,), generator=generator).tolist()])


def siglip_inputs(model, images: int, seed: int) -> dict:
    per_image = 16 if model.config.vision_feature_select_strategy == "full" else 15
    input_ids = prompt([[IMAGE_TOKEN_ID] * per_image] * images, seed)
    pixel_values = torch.randn(images, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}


def pixtral_inputs(sizes: list[tuple[int, int]], seed: int) -> dict:
    """As Pixtral's processor gives them (``tiny_vlms_more.pixtral_images``), image_sizes the real sizes."""
    blocks, pixel_values = pixtral_images(sizes, torch.Generator().manual_seed(seed), IMAGE_TOKEN_ID, BREAK, END)
    input_ids = prompt(blocks, seed)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values,
            "image_sizes": torch.tensor(sizes)}


def left_padded(rows: list[dict]) -> dict:
    """The batch of ``rows`` as a processor gives it: tokens left-padded, images concatenated (Pixtral's padded to the
    largest of the batch)."""
    length = max(row["input_ids"].shape[1] for row in rows)
    batch = {"input_ids": torch.cat([torch.nn.functional.pad(row["input_ids"], (length - row["input_ids"].shape[1], 0))
                                     for row in rows]),
             "attention_mask": torch.cat([torch.nn.functional.pad(row["attention_mask"],
                                                                  (length - row["input_ids"].shape[1], 0))
                                          for row in rows])}
    height = max(row["pixel_values"].shape[2] for row in rows)
    width = max(row["pixel_values"].shape[3] for row in rows)
    batch["pixel_values"] = torch.cat([torch.nn.functional.pad(row["pixel_values"],
                                                               (0, width - row["pixel_values"].shape[3],
                                                                0, height - row["pixel_values"].shape[2]))
                                       for row in rows])
    if "image_sizes" in rows[0]:
        batch["image_sizes"] = torch.cat([row["image_sizes"] for row in rows])
    return batch


def reference(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)


CASES = {
    "siglip-full": lambda: (tiny_llava_with("siglip", "full"), lambda model, seed: siglip_inputs(model, 1 + seed, seed)),
    "siglip-default": lambda: (tiny_llava_with("siglip", "default"),
                               lambda model, seed: siglip_inputs(model, 1 + seed, seed)),
    "pixtral": lambda: (tiny_llava_with("pixtral"),
                        lambda model, seed: pixtral_inputs([(32, 48), (16, 24)][: 1 + seed], seed)),
    # Mistral 3: the same tower with 2x2 patches merged into one feature (its own family adapter, the same rule)
    "mistral3": lambda: (tiny_mistral3()[0],
                         lambda model, seed: tiny_mistral3(seed, sizes=[((32, 24),), ((16, 16), (16, 40))][seed])[1]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("policy", ["ar", "sage", "sage_cost"])
def test_prompts_and_batches_equal_target_generate(case, policy):
    model, make_inputs = CASES[case]()
    draft = correlated_draft(model, noise=0.1)
    rows = [make_inputs(model, 0), make_inputs(model, 1)]  # one image; two (Pixtral: of two sizes)
    for inputs in rows:
        sequences, _ = sage_ext.generate(model, draft, policy=policy, **inputs, max_new_tokens=MAX_NEW)
        assert torch.equal(sequences, reference(model, inputs))
    batch = left_padded(rows)
    sequences, _ = sage_ext.generate(model, draft, policy=policy, **batch, max_new_tokens=MAX_NEW, pad_token_id=0)
    assert torch.equal(sequences, reference(model, batch))


@pytest.mark.parametrize("case", list(CASES))
def test_a_placeholder_count_that_does_not_match_the_tower_is_refused(case):
    model, make_inputs = CASES[case]()
    inputs = make_inputs(model, 0)
    position = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    inputs["input_ids"][0, position] = 5  # one placeholder fewer than the image's features
    with pytest.raises(ValueError, match="image placeholder tokens"):
        sage_ext.generate(model, None, policy="ar", **inputs, max_new_tokens=2)


def test_mistral3_images_need_their_sizes():
    model, inputs = tiny_mistral3()
    del inputs["image_sizes"]
    with pytest.raises(ValueError, match="pixel_values were given without image_sizes"):
        sage_ext.generate(model, None, policy="ar", **inputs, max_new_tokens=2)
