"""transformers' own `generate(custom_generate=sage_ext.custom_generate_path(), assistant_model=draft)`.

Greedy identity with plain `target.generate` on the bundled fixture pair and on tiny Llamas, the argument
mapping (lengths from the call, a GenerationConfig or transformers' default, positional inputs, streamer,
sampling settings, return_dict_in_generate), refusals, and the folder layout transformers loads.
"""
import fnmatch
import os
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig, TextStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

import sage_ext
from sage_ext.custom_generate import SpeculativeGenerateOutput
from sage_ext.fixtures import DRAFT_DIR, TARGET_DIR, scenes
from tiny_models import one_thread, tiny_llama, tiny_tokenizer  # noqa: F401  (one_thread: autouse)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def custom(model, *args, **kwargs):
    """``model.generate`` through sage_ext's custom_generate folder."""
    return model.generate(*args, custom_generate=sage_ext.custom_generate_path(), trust_remote_code=True, **kwargs)


@pytest.fixture(scope="module")
def fixture_pair():
    processor = AutoProcessor.from_pretrained(TARGET_DIR)
    target = AutoModelForImageTextToText.from_pretrained(TARGET_DIR, attn_implementation="sdpa").eval()
    draft = AutoModelForImageTextToText.from_pretrained(DRAFT_DIR, attn_implementation="sdpa").eval()
    inputs = processor(text=scenes.caption_prompt(), images=scenes.heldout_scenes(1, start=7)[0].render(),
                       return_tensors="pt")
    return target, draft, processor, inputs


@pytest.fixture(scope="module")
def tiny_pair():
    target, inputs = tiny_llama(seed=0)
    draft, _ = tiny_llama(seed=1, small=True)
    return target, draft, inputs


def test_the_folder_has_transformers_layout():
    folder = Path(sage_ext.custom_generate_path())
    assert (folder / "custom_generate" / "generate.py").is_file()
    assert "sage_ext" in (folder / "custom_generate" / "requirements.txt").read_text().split()
    assert folder == Path(sage_ext.__file__).parent


def test_the_wheel_includes_the_folder():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    # the wheel packages the whole sage_ext folder minus wheel.exclude (scikit-build-core): nothing excludes these
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["scikit-build"]
    assert "sage_ext" in build["wheel"]["packages"]
    for name in ("generate.py", "requirements.txt", "__init__.py"):
        path = f"sage_ext/custom_generate/{name}"
        assert not any(fnmatch.fnmatch(path, pattern) for pattern in build["wheel"].get("exclude", [])), path


@pytest.mark.parametrize("policy", ["sage", "static", "chain"])
def test_fixture_pair_greedy_equals_target_generate(fixture_pair, policy):
    target, draft, processor, inputs = fixture_pair
    expected = target.generate(**inputs, max_new_tokens=60, do_sample=False)
    out = custom(target, **inputs, assistant_model=draft, policy=policy, max_new_tokens=60)
    assert isinstance(out, torch.Tensor) and torch.equal(out, expected)
    text = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.startswith("The image shows")


def test_return_dict_in_generate_gives_a_decoder_only_output_with_stats(fixture_pair):
    target, draft, _, inputs = fixture_pair
    expected = target.generate(**inputs, max_new_tokens=60, do_sample=False)
    out = custom(target, **inputs, assistant_model=draft, max_new_tokens=60, return_dict_in_generate=True)
    # transformers runs its own copy of custom_generate/generate.py: the same class, defined in that copy
    assert isinstance(out, GenerateDecoderOnlyOutput) and type(out).__name__ == SpeculativeGenerateOutput.__name__
    assert torch.equal(out.sequences, expected) and out.scores is None
    assert out.stats.new_tokens == expected.shape[1] - inputs["input_ids"].shape[1]
    assert out.stats.target_forwards < out.stats.new_tokens  # speculation accepted draft tokens


def test_a_batch_with_a_node_budget(fixture_pair):
    """A processor batch of two scenes (equal prompt lengths: no padding, so HF's batched rows are the rows
    alone) with a small node budget for the batch, through custom_generate and the one-call form."""
    target, draft, processor, _ = fixture_pair
    images = [scene.render() for scene in scenes.heldout_scenes(2, start=9)]
    batch = processor(text=[scenes.caption_prompt()] * 2, images=images, return_tensors="pt", padding=True,
                      padding_side="left")
    expected = target.generate(**batch, max_new_tokens=40, do_sample=False)
    out = custom(target, **batch, assistant_model=draft, batch_node_budget=8, max_new_tokens=40)
    assert torch.equal(out, expected)
    direct, stats = sage_ext.generate(target, draft, "dynamic", **batch, batch_node_budget=8, max_new_tokens=40)
    assert torch.equal(direct, expected)
    # each row's share of the 8 nodes, root aside: 3 while both run, 7 for the last one
    assert max(step.tree_slots for row in stats for step in row.steps[:2]) == 3
    assert max(step.tree_slots for row in stats for step in row.steps) <= 7


def test_tiny_llama_lengths_follow_transformers(tiny_pair):
    target, draft, inputs = tiny_pair
    prompt_len = inputs["input_ids"].shape[1]
    # nothing set: transformers' default of 20 new tokens
    out = custom(target, **inputs, assistant_model=draft)
    with warnings.catch_warnings():  # transformers recommends max_new_tokens over its default length
        warnings.simplefilter("ignore", UserWarning)
        reference = target.generate(**inputs, do_sample=False)
    assert torch.equal(out, reference)
    assert out.shape[1] == prompt_len + 20
    # a GenerationConfig, max_length, and the prompt passed positionally
    config = GenerationConfig(max_new_tokens=15, do_sample=False, eos_token_id=target.generation_config.eos_token_id)
    out = custom(target, inputs["input_ids"], generation_config=config, assistant_model=draft,
                 attention_mask=inputs["attention_mask"])
    assert torch.equal(out, target.generate(**inputs, max_new_tokens=15, do_sample=False))
    out = custom(target, **inputs, assistant_model=draft, policy="dynamic", max_length=prompt_len + 25)
    assert torch.equal(out, target.generate(**inputs, max_length=prompt_len + 25, do_sample=False))
    # no draft, target-only decoding
    assert torch.equal(custom(target, **inputs, policy="ar", max_new_tokens=12),
                       target.generate(**inputs, max_new_tokens=12, do_sample=False))
    # what a given config leaves unset comes from the model's own, as in transformers
    target.generation_config.max_new_tokens = 7
    try:
        out = custom(target, **inputs, generation_config=GenerationConfig(do_sample=False), assistant_model=draft)
        assert torch.equal(out, target.generate(**inputs, generation_config=GenerationConfig(do_sample=False)))
        assert out.shape[1] == prompt_len + 7
    finally:
        target.generation_config.max_new_tokens = None
    # a misspelled argument is an error, as in transformers, not an input nothing reads
    with pytest.raises(ValueError, match="'max_new_token' are neither generate arguments nor inputs"):
        custom(target, **inputs, assistant_model=draft, max_new_token=5)
    # the default length stops at max_position_embeddings, as transformers' does
    limit, target.config.max_position_embeddings = target.config.max_position_embeddings, prompt_len + 8
    try:
        out = custom(target, **inputs, assistant_model=draft, eos_token_id=-1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            assert torch.equal(out, target.generate(**inputs, do_sample=False, eos_token_id=-1))
        assert out.shape[1] == prompt_len + 8
    finally:
        target.config.max_position_embeddings = limit


def test_streamer_and_sampling_settings_reach_the_engine(tiny_pair, capsys):
    target, draft, inputs = tiny_pair
    tokenizer = tiny_tokenizer()
    expected = target.generate(**inputs, max_new_tokens=25, do_sample=False)
    out = custom(target, **inputs, assistant_model=draft, max_new_tokens=25,
                 streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    assert torch.equal(out, expected)
    assert capsys.readouterr().out == tokenizer.decode(expected[0, 12:], skip_special_tokens=True) + "\n"

    def seeded():
        return torch.Generator().manual_seed(3)

    settings = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=25)
    # a fixed-rule policy on both sides: the default sage_cost shapes its trees from measured times, so under
    # sampling two runs draw the same seed's uniforms for different trees
    sampled = custom(target, **inputs, assistant_model=draft, policy="sage", generator=seeded(), **settings)
    direct, _ = sage_ext.generate(target, draft, "sage", **inputs, generator=seeded(), **settings)
    assert torch.equal(sampled, direct)
    greedy_direct, _ = sage_ext.generate(target, draft, "sage", **inputs, max_new_tokens=25)
    assert torch.equal(greedy_direct, expected)


def test_unsupported_arguments_are_refused(tiny_pair):
    target, draft, inputs = tiny_pair
    with pytest.raises(ValueError, match="needs the draft model: pass assistant_model"):
        custom(target, **inputs, max_new_tokens=5)
    with pytest.raises(ValueError, match="num_beams=2 not supported"):
        custom(target, **inputs, assistant_model=draft, num_beams=2, max_new_tokens=5)
    with pytest.raises(ValueError, match="output_scores=True not supported"):
        custom(target, **inputs, assistant_model=draft, output_scores=True, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="'logits_processor' is not supported"):
        custom(target, **inputs, assistant_model=draft, logits_processor=[lambda ids, scores: scores])
