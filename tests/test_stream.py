"""Streaming: `SpeculativeGenerator.stream` / `sage_ext.stream`, and transformers' streamers as `streamer=`.

Every streamed output is checked against `target.generate(do_sample=False)`: the concatenated token pieces are
its new tokens, the concatenated text pieces its decoded text. Also: early stop, errors reach the consumer.
"""
import os
import threading

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer, TextStreamer

import sage_ext
from sage_ext.fixtures import DRAFT_DIR, TARGET_DIR, scenes
from tiny_models import one_thread, tiny_llama, tiny_tokenizer  # noqa: F401  (one_thread: autouse)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def fixture_pair():
    processor = AutoProcessor.from_pretrained(TARGET_DIR)
    target = AutoModelForImageTextToText.from_pretrained(TARGET_DIR, attn_implementation="sdpa").eval()
    draft = AutoModelForImageTextToText.from_pretrained(DRAFT_DIR, attn_implementation="sdpa").eval()
    inputs = processor(text=scenes.caption_prompt(), images=scenes.heldout_scenes(1, start=42)[0].render(),
                       return_tensors="pt")
    with torch.inference_mode():
        expected = target.generate(**inputs, max_new_tokens=60, do_sample=False)
    text = processor.decode(expected[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return target, draft, processor, inputs, expected, text


@pytest.fixture(scope="module")
def tiny_pair():
    target, inputs = tiny_llama(seed=0)
    draft, _ = tiny_llama(seed=1, small=True)
    expected = target.generate(**inputs, max_new_tokens=30, do_sample=False)
    return target, draft, inputs, expected


@pytest.mark.parametrize("policy", ["sage", "chain", "ar"])
def test_text_stream_on_the_fixture_pair_is_the_target_greedy_text(fixture_pair, policy):
    target, draft, processor, inputs, expected, text = fixture_pair
    stream = sage_ext.SpeculativeGenerator(target, draft, policy).stream(tokenizer=processor, **inputs,
                                                                         max_new_tokens=60)
    pieces = list(stream)
    assert all(isinstance(p, str) for p in pieces) and len(pieces) > 3
    assert "".join(pieces) == text and text.startswith("The image shows")
    assert torch.equal(stream.output.sequences, expected)
    if policy != "ar":
        assert stream.output.stats.target_forwards < stream.output.stats.new_tokens


def test_one_call_stream_of_token_ids(fixture_pair):
    target, draft, _, inputs, expected, _ = fixture_pair
    stream = sage_ext.stream(target, draft, "sage", **inputs, max_new_tokens=60)
    pieces = list(stream)
    assert all(p.dtype == torch.int64 and p.dim() == 1 for p in pieces)
    assert torch.equal(torch.cat([inputs["input_ids"][0], *pieces]), expected[0])
    # one piece for the prefill's token, then one per speculation step (its accepted tokens + the bonus)
    assert len(pieces) == stream.output.stats.target_forwards + 1
    assert max(len(p) for p in pieces) > 1


def test_token_and_text_streams_on_a_tiny_text_model(tiny_pair):
    target, draft, inputs, expected = tiny_pair
    gen = sage_ext.SpeculativeGenerator(target, draft, "sage")
    tokens = list(gen.stream(**inputs, max_new_tokens=30))
    assert torch.equal(torch.cat([inputs["input_ids"][0], *tokens]), expected[0])
    tokenizer = tiny_tokenizer()
    text = "".join(gen.stream(tokenizer=tokenizer, **inputs, max_new_tokens=30))
    assert text == tokenizer.decode(expected[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text) > 10


def test_transformers_text_streamer_as_the_streamer(fixture_pair, capsys):
    target, draft, processor, inputs, expected, text = fixture_pair
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    sequences, _ = sage_ext.generate(target, draft, "sage", **inputs, max_new_tokens=60, streamer=streamer)
    assert torch.equal(sequences, expected)
    assert capsys.readouterr().out == text + "\n"


def test_transformers_text_iterator_streamer_as_the_streamer(fixture_pair):
    target, draft, processor, inputs, expected, text = fixture_pair
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=120)
    gen = sage_ext.SpeculativeGenerator(target, draft, "sage")
    result = {}
    threads = torch.get_num_threads()

    def work():
        torch.set_num_threads(threads)
        result["out"] = gen.generate(**inputs, max_new_tokens=60, streamer=streamer)

    worker = threading.Thread(target=work)
    worker.start()
    streamed = "".join(streamer)
    worker.join()
    assert streamed == text
    assert torch.equal(result["out"].sequences, expected)


def test_stopping_early_ends_the_generation(tiny_pair):
    target, draft, inputs, _ = tiny_pair
    gen = sage_ext.SpeculativeGenerator(target, draft, "ar")  # one token per step: 40 steps if run to the end
    steps, proceed = [], threading.Event()

    def hook(debug):
        steps.append(debug.step)
        assert proceed.wait(timeout=60)

    gen.step_hook = hook
    stream = gen.stream(**inputs, max_new_tokens=40, eos_token_id=[])
    first = next(stream)  # the prefill's token; the worker can go no further than the first step's hook
    assert first.shape == (1,)
    stream.stop()
    proceed.set()
    stream.close()
    assert list(stream) == []
    # the stop is seen at the next stream put: step 1's (before its hook) or step 2's (after step 1's hook)
    assert stream.output is None and steps in ([], [1])


def test_dropping_the_iterator_after_a_break_ends_the_generation(tiny_pair):
    target, draft, inputs, _ = tiny_pair
    gen = sage_ext.SpeculativeGenerator(target, draft, "ar")
    steps, proceed = [], threading.Event()

    def hook(debug):
        steps.append(debug.step)
        assert proceed.wait(timeout=60)

    gen.step_hook = hook
    for _ in gen.stream(**inputs, max_new_tokens=40, eos_token_id=[]):
        break  # the iterator is dropped here: its __del__ asks the worker to stop
    proceed.set()
    for thread in threading.enumerate():
        if thread.name == "sage_ext-stream":
            thread.join(timeout=60)
    assert steps in ([], [1])


def test_errors_reach_the_consumer_and_own_streamer_is_refused(tiny_pair):
    target, draft, inputs, _ = tiny_pair
    gen = sage_ext.SpeculativeGenerator(target, draft, "sage")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        list(gen.stream(**inputs, max_new_tokens=0))
    with pytest.raises(ValueError, match="makes its own streamer"):
        gen.stream(**inputs, max_new_tokens=4, streamer=TextStreamer(tiny_tokenizer()))
