"""Generation settings read as ``generate`` reads them: the call's arguments over a given ``generation_config`` over
the target's own, every entry honoured or refused (never ignored), and the repetition penalty applied to every
tree node as transformers applies it to one-token decoding (Qwen2-VL / Qwen2.5-VL instruct checkpoints ship one)."""
from __future__ import annotations

import re

import pytest
import torch
from test_batch_split import CASES, assemble
from test_engine import POLICIES, hf_greedy
from tiny_models import correlated_draft, one_thread, tiny_llama, tiny_tokenizer  # noqa: F401  (one_thread: autouse)
from tiny_vlms import tiny_qwen2_5_vl
from transformers import GenerationConfig
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from sage_ext.engine import SpeculativeGenerator
from sage_ext.engine.processing import penalize_repeats, tree_paths

PENALTY = 1.3  # strong enough to change these tiny models' greedy outputs (each test checks that it does)


def _set(config, **entries):
    """Set generation-config entries; returns what was there, for ``_set(config, **old)`` afterwards."""
    old = {key: getattr(config, key, None) for key in entries}
    for key, value in entries.items():
        setattr(config, key, value)
    return old


# ------------------------------------------------------------------------------------------ the penalty itself
def test_the_tree_penalty_is_transformers_processor_at_every_node():
    """Every node of a random tree gets the scores transformers' processor gives after the node's whole context
    (committed tokens, then its path from the root), bit for bit."""
    gen = torch.Generator().manual_seed(0)
    vocab, nodes = 50, 12
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 3, 5, 6, 8, 9])
    depth = 5  # the deepest node (11: 9 <- 6 <- 3 <- 1 <- 0) is 5 levels below the root
    tokens = torch.randint(0, vocab, (nodes,), generator=gen)
    context = torch.cat([torch.randint(0, vocab, (20,), generator=gen), tokens[:1]])  # the root is committed
    context[3] = vocab + 7  # a prompt id beyond the scores' width: not penalized, as in transformers
    scores = torch.randn(nodes, vocab, generator=gen) * 3
    paths, depths = tree_paths(tokens, parents, depth)
    got = penalize_repeats(scores.clone(), context, paths, PENALTY)
    processor = RepetitionPenaltyLogitsProcessor(PENALTY)
    for node in range(nodes):
        path, n = [], node
        while n > 0:
            path.append(int(tokens[n]))
            n = int(parents[n])
        assert int(depths[node]) == len(path)
        ids = torch.cat([context, torch.tensor(path[::-1], dtype=torch.int64)])[None]
        assert torch.equal(got[node], processor(ids, scores[node: node + 1].clone())[0]), f"node {node}"


# ------------------------------------------------------------------------------------------ greedy, every policy
@pytest.fixture(scope="module")
def llama():
    target, inputs = tiny_llama(seed=0)
    return target, correlated_draft(target, noise=0.1), inputs


@pytest.mark.parametrize("policy", list(POLICIES))
def test_repetition_penalty_of_the_generation_config_every_policy(llama, policy):
    """The target's generation_config sets a repetition penalty: target.generate applies it, so the engine does, at
    every node of every tree (the output equals target.generate's, which the penalty changes)."""
    target, draft, inputs = llama
    old = _set(target.generation_config, repetition_penalty=PENALTY)
    try:
        expected = hf_greedy(target, inputs, max_new_tokens=24)
        out = SpeculativeGenerator(target, draft if policy != "ar" else None, POLICIES[policy]()).generate(
            **inputs, max_new_tokens=24)
    finally:
        _set(target.generation_config, **old)
    assert torch.equal(out.sequences, expected)
    assert not torch.equal(expected, hf_greedy(target, inputs, max_new_tokens=24))  # the penalty mattered
    if policy != "ar":
        assert sum(step.tau for step in out.stats.steps) > 0


def test_repetition_penalty_as_an_argument(llama):
    target, draft, inputs = llama
    out = SpeculativeGenerator(target, draft, "sage_cost").generate(**inputs, max_new_tokens=24,
                                                                     repetition_penalty=PENALTY)
    assert torch.equal(out.sequences, hf_greedy(target, inputs, max_new_tokens=24, repetition_penalty=PENALTY))
    # the argument overrides the config's, 1.0 turning it off
    old = _set(target.generation_config, repetition_penalty=PENALTY)
    try:
        off = SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=24, repetition_penalty=1.0)
    finally:
        _set(target.generation_config, **old)
    assert torch.equal(off.sequences, hf_greedy(target, inputs, max_new_tokens=24))


def test_qwen_vl_instruct_generation_config_as_shipped():
    """Qwen2-VL / Qwen2.5-VL instruct checkpoints ship do_sample with top_k 1, top_p 0.001, a low temperature and
    repetition_penalty 1.05: target.generate(**inputs) with no settings then decodes deterministically with the
    penalty (through the sampling path), and so does the engine."""
    target, inputs = tiny_qwen2_5_vl(seed=4)  # its greedy output repeats itself: the penalty of 1.05 changes it
    draft = correlated_draft(target, noise=0.1)
    old = _set(target.generation_config, do_sample=True, top_k=1, top_p=0.001, temperature=0.1,
               repetition_penalty=PENALTY)
    try:
        with torch.no_grad():
            expected = target.generate(**inputs, max_new_tokens=20)
        for policy in ("ar", "chain", "sage", "sage_cost"):
            out = SpeculativeGenerator(target, draft if policy != "ar" else None, POLICIES[policy]()).generate(
                **inputs, max_new_tokens=20, generator=torch.Generator().manual_seed(0))
            assert torch.equal(out.sequences, expected), policy
        # the same settings, greedy: the penalty on the greedy path gives the same tokens
        out = SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=20, do_sample=False)
        assert torch.equal(out.sequences, expected)
    finally:
        _set(target.generation_config, **old)
    assert not torch.equal(expected, hf_greedy(target, inputs, max_new_tokens=20))


@pytest.mark.parametrize("name", ["llama", "qwen2_vl"])
def test_every_row_of_a_batch_is_penalized_by_its_own_tokens(name):
    """A left-padded batch: each row equals target.generate on that row alone (transformers leaves the padding out
    of the penalty as well)."""
    model, rows, layout = CASES[name]()
    batch = assemble(rows, **layout)
    expected = [hf_greedy(model, row, max_new_tokens=12, repetition_penalty=PENALTY)[0, row["input_ids"].shape[1]:]
                for row in rows]
    out = SpeculativeGenerator(model, correlated_draft(model, noise=0.1), "sage").generate(
        **batch, max_new_tokens=12, repetition_penalty=PENALTY, pad_token_id=1)
    for b, new in enumerate(expected):
        assert torch.equal(out.sequences[b, batch["input_ids"].shape[1]:][: len(new)], new), f"row {b}"


# ------------------------------------------------------------------------------------------ minimum lengths
@pytest.mark.parametrize("policy", ["ar", "chain", "static", "sage", "sage_cost"])
@pytest.mark.parametrize("entry", ["min_new_tokens", "min_length"])
def test_minimum_lengths_forbid_eos_at_every_node(llama, policy, entry):
    """min_new_tokens / min_length (an argument or the config's): EOS is forbidden at every node whose position is
    before the minimum, as generate forbids it token by token. The EOS here is the 3rd token of the free output, so
    the minimum moves the end."""
    target, draft, inputs = llama
    prompt_len = inputs["input_ids"].shape[1]
    free = hf_greedy(target, inputs, max_new_tokens=20, eos_token_id=-1)[0, prompt_len:]
    eos = int(free[2])
    minimum = 8 if entry == "min_new_tokens" else prompt_len + 8
    generator = SpeculativeGenerator(target, draft if policy != "ar" else None, POLICIES[policy]())
    expected = hf_greedy(target, inputs, max_new_tokens=20, eos_token_id=eos, **{entry: minimum})
    assert expected.shape[1] > prompt_len + 3  # the minimum mattered: generate did not stop at the free EOS
    out = generator.generate(**inputs, max_new_tokens=20, eos_token_id=eos, **{entry: minimum})
    assert torch.equal(out.sequences, expected)
    old = _set(target.generation_config, **{entry: minimum})
    try:
        assert torch.equal(generator.generate(**inputs, max_new_tokens=20, eos_token_id=eos).sequences, expected)
    finally:
        _set(target.generation_config, **old)


def test_min_new_tokens_takes_precedence_over_min_length(llama):
    """Both set (either in the call or the config): generate keeps min_new_tokens only."""
    target, draft, inputs = llama
    prompt_len = inputs["input_ids"].shape[1]
    eos = int(hf_greedy(target, inputs, max_new_tokens=20, eos_token_id=-1)[0, prompt_len + 2])
    generator = SpeculativeGenerator(target, draft, "sage")
    for config, call in (({}, {"min_new_tokens": 1, "min_length": prompt_len + 12}),
                         ({"min_length": prompt_len + 12}, {"min_new_tokens": 1}),
                         ({"min_new_tokens": 1}, {"min_length": prompt_len + 12})):
        old = _set(target.generation_config, **config)
        try:
            expected = hf_greedy(target, inputs, max_new_tokens=20, eos_token_id=eos, **call)
            out = generator.generate(**inputs, max_new_tokens=20, eos_token_id=eos, **call)
        finally:
            _set(target.generation_config, **old)
        assert torch.equal(out.sequences, expected), (config, call)
        assert expected.shape[1] == prompt_len + 3  # min_new_tokens 1 let the early EOS end it


def test_minimum_length_when_sampling(llama):
    """Sampling (top_k 1: deterministic) with min_new_tokens and a repetition penalty together, as generate."""
    target, draft, inputs = llama
    prompt_len = inputs["input_ids"].shape[1]
    eos = int(hf_greedy(target, inputs, max_new_tokens=20, eos_token_id=-1, repetition_penalty=PENALTY)[0, prompt_len + 2])
    settings = dict(do_sample=True, top_k=1, max_new_tokens=20, eos_token_id=eos, min_new_tokens=9,
                    repetition_penalty=PENALTY)
    with torch.no_grad():
        expected = target.generate(**inputs, **settings)
    assert expected.shape[1] >= prompt_len + 9
    out = SpeculativeGenerator(target, draft, "sage").generate(**inputs, **settings,
                                                                 generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.sequences, expected)


# ------------------------------------------------------------------------------------------ the other entries
@pytest.mark.parametrize("entry, neutral", [
    ({"no_repeat_ngram_size": 2}, {"no_repeat_ngram_size": 0}),
    ({"num_beams": 3}, {"num_beams": 1}),
    ({"suppress_tokens": [5, 6]}, {"suppress_tokens": []}),
    ({"forced_eos_token_id": 3}, None),
])
def test_config_entries_the_engine_does_not_implement_are_refused(llama, entry, neutral):
    """Such an entry of the target's generation config was ignored, so the output silently differed from
    target.generate's: it is refused, naming it and how to decode without it; given so, the call runs."""
    target, draft, inputs = llama
    generator = SpeculativeGenerator(target, draft, "sage")
    old = _set(target.generation_config, **entry)
    try:
        (key, value), = entry.items()
        way = f"pass {key}=" if neutral is not None else f"set model.generation_config.{key} = None"
        with pytest.raises(ValueError, match=re.escape(f"generation config sets {key}={value!r}") + ".*" + re.escape(way)):
            generator.generate(**inputs, max_new_tokens=6)
        if neutral is not None:
            out = generator.generate(**inputs, max_new_tokens=6, **neutral)
            assert torch.equal(out.sequences, hf_greedy(target, inputs, max_new_tokens=6, **neutral))
    finally:
        _set(target.generation_config, **old)


def test_config_entries_that_change_no_token_are_accepted(llama):
    """Cache and output settings, beam-only settings, sampling settings in greedy decoding, keys that are no
    GenerationConfig field: generate's tokens do not depend on them, and the engine runs."""
    target, draft, inputs = llama
    entries = dict(cache_implementation="dynamic", return_dict_in_generate=True, output_scores=True,
                   length_penalty=2.0, typical_p=0.5, min_p=0.1,
                   presence_penalty=1.5)  # not a GenerationConfig field (serving engines read it): generate ignores it
    old = _set(target.generation_config, **entries)
    try:
        out = SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=6)
    finally:
        _set(target.generation_config, **old)
    assert torch.equal(out.sequences, hf_greedy(target, inputs, max_new_tokens=6))


@pytest.mark.parametrize("entries", [
    dict(use_cache=False, cache_implementation="static", max_cache_len=64, low_memory=True, disable_compile=True,
         prompt_lookup_num_tokens=3, num_assistant_tokens=4, renormalize_logits=True),
    dict(length_penalty=2.0, early_stopping=True, num_beam_groups=1, diversity_penalty=0.5, use_mtp=False,
         assistant_early_exit=1),
])
def test_settings_that_change_no_token_are_accepted_as_arguments_too(llama, entries):
    """The same settings are neutral whether the call or a generation config sets them."""
    target, draft, inputs = llama
    out = SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=6, **entries)
    assert torch.equal(out.sequences, hf_greedy(target, inputs, max_new_tokens=6))


def test_output_requests_of_the_call_are_refused(llama):
    target, draft, inputs = llama
    with pytest.raises(ValueError, match="output_scores=True"):
        SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=6, output_scores=True)


def test_a_batch_without_eos_or_stop_strings_needs_no_pad_id():
    """No row can end early, so nothing is filled (it needed a pad_token_id before)."""
    model, rows, layout = CASES["llama"]()
    batch = assemble(rows, **layout)
    old = _set(model.generation_config, eos_token_id=None, pad_token_id=None)
    try:
        out = SpeculativeGenerator(model, correlated_draft(model, noise=0.1), "sage").generate(
            **batch, max_new_tokens=6)
        expected = [hf_greedy(model, row, max_new_tokens=6)[0, row["input_ids"].shape[1]:] for row in rows]
    finally:
        _set(model.generation_config, **old)
    for b, new in enumerate(expected):
        assert torch.equal(out.sequences[b, batch["input_ids"].shape[1]:], new), f"row {b}"


def test_sampling_only_entries_are_refused_when_sampling(llama):
    target, draft, inputs = llama
    old = _set(target.generation_config, do_sample=True, typical_p=0.5)
    try:
        with pytest.raises(ValueError, match="generation config sets typical_p=0.5"):
            SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=6)
    finally:
        _set(target.generation_config, **old)


def test_lengths_of_the_generation_config(llama):
    """As generate ranks them: max_new_tokens (the call's, else the config's) over max_length (the call's, else the
    config's); each case checked against target.generate."""
    target, draft, inputs = llama
    generator = SpeculativeGenerator(target, draft, "sage")
    prompt_len = inputs["input_ids"].shape[1]
    eos = {"eos_token_id": -1}
    for entries, call in (({"max_new_tokens": 7}, {}), ({"max_length": prompt_len + 5}, {}),
                          ({"max_new_tokens": 7, "max_length": prompt_len + 3}, {}),
                          ({"max_new_tokens": 7}, {"max_new_tokens": 2}),
                          ({"max_new_tokens": 7}, {"max_length": prompt_len + 4}),  # the config's max_new_tokens wins
                          ({"max_length": prompt_len + 9}, {"max_length": prompt_len + 4})):
        old = _set(target.generation_config, **entries)
        try:
            expected = hf_greedy(target, inputs, **eos, **call)
            assert torch.equal(generator.generate(**inputs, **eos, **call).sequences, expected), (entries, call)
        finally:
            _set(target.generation_config, **old)
    old = _set(target.generation_config, max_length=prompt_len)
    try:
        with pytest.raises(ValueError, match=r"the generation config's max_length \(12\) leaves no room"):
            generator.generate(**inputs)
    finally:
        _set(target.generation_config, **old)


def test_stop_strings_of_the_generation_config(llama):
    target, draft, inputs = llama
    tokenizer = tiny_tokenizer()
    generator = SpeculativeGenerator(target, draft, "sage")
    full = generator.generate(**inputs, max_new_tokens=16, eos_token_id=-1).sequences
    stop = tokenizer.decode(full[0, inputs["input_ids"].shape[1] + 3])
    old = _set(target.generation_config, stop_strings=[stop])
    try:
        with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
            generator.generate(**inputs, max_new_tokens=16, eos_token_id=-1)
        out = generator.generate(**inputs, max_new_tokens=16, eos_token_id=-1, tokenizer=tokenizer)
        with torch.no_grad():
            expected = target.generate(**inputs, max_new_tokens=16, eos_token_id=-1, tokenizer=tokenizer,
                                       do_sample=False)
    finally:
        _set(target.generation_config, **old)
    assert torch.equal(out.sequences, expected)
    assert out.sequences.shape[1] < full.shape[1]  # the stop string ended it


def test_a_given_generation_config_over_the_targets_own(llama):
    """generate(generation_config=...) as in transformers: its entries over the model's, the call's over both."""
    target, draft, inputs = llama
    generator = SpeculativeGenerator(target, draft, "sage")
    config = GenerationConfig(max_new_tokens=9, repetition_penalty=PENALTY)
    out = generator.generate(**inputs, generation_config=config)
    assert torch.equal(out.sequences, hf_greedy(target, inputs, generation_config=config))
    out = generator.generate(**inputs, generation_config=config, max_new_tokens=4)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 4
    with pytest.raises(ValueError, match="generation config sets no_repeat_ngram_size=2"):
        generator.generate(**inputs, generation_config=GenerationConfig(no_repeat_ngram_size=2))
