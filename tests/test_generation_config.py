"""Generation settings read as ``generate`` reads them: the call's arguments over a given ``generation_config`` over
the target's own, every entry honoured or refused (never ignored), and the repetition penalty applied to every
tree node as transformers applies it to one-token decoding (Qwen2-VL / Qwen2.5-VL instruct checkpoints ship one)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from test_batch_split import CASES, assemble
from test_engine import POLICIES, hf_greedy
from tiny_models import correlated_draft, one_thread, tiny_llama, tiny_tokenizer  # noqa: F401  (one_thread: autouse)
from tiny_vlms import tiny_qwen2_5_vl
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from sage_ext.engine import SpeculativeGenerator
from sage_ext.engine.processing import TargetProcessing, penalize_repeats, transformers_processors, tree_paths

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


def _random_tree(vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 3, 5, 6, 8, 9])
    tokens = torch.randint(0, vocab, (parents.shape[0],), generator=gen)
    context = torch.cat([torch.randint(0, vocab, (7,), generator=gen), tokens[:1]])  # the root is committed
    return tokens, parents, 5, context, gen


def _node_ids(tokens, parents, context, node):
    path, n = [], node
    while n > 0:
        path.append(int(tokens[n]))
        n = int(parents[n])
    return torch.cat([context, torch.tensor(path[::-1], dtype=torch.int64)])[None]


def test_transformers_processors_at_every_node():
    """The processors of the other settings (transformers' own classes, called once per depth on every node's ids)
    give every node of a random tree what they give after the node's whole context, bit for bit, in generate's
    order around the penalty and the minimum lengths; each setting changes some node's scores here."""
    vocab, max_new = 30, 10
    tokens, parents, depth, context, gen = _random_tree(vocab, 1)
    prompt_len, eos = 4, [int(tokens[3]), 2]
    settings = {"sequence_bias": {(int(tokens[1]),): -2.0, (int(tokens[1]), int(tokens[3])): 4.0},
                "no_repeat_ngram_size": 2,
                "bad_words_ids": [[int(tokens[2]), int(tokens[5])], [int(tokens[6])]],
                "forced_eos_token_id": 9, "remove_invalid_values": True,
                "exponential_decay_length_penalty": (2, 1.7), "suppress_tokens": [0, 11],
                "begin_suppress_tokens": [int(tokens[4])]}
    scores = torch.randn(tokens.shape[0], vocab, generator=gen) * 3
    scores[4, 5] = float("nan")
    processing = TargetProcessing(PENALTY, 0, 3, torch.tensor(eos), eos, settings, max_new)
    got = processing(scores.clone(), context, prompt_len, (tokens, parents, depth))
    row = transformers_processors(settings, eos, prompt_len, max_new)
    # generate's order: sequence bias, penalty, repeated n-grams, banned words, minimum new tokens, then the rest
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor
    expected = LogitsProcessorList([*row.before_penalty, RepetitionPenaltyLogitsProcessor(PENALTY),
                                    *row.before_min_lengths, MinNewTokensLengthLogitsProcessor(prompt_len, 3, eos),
                                    *row.after_min_lengths])
    assert len(expected) == 10
    for node in range(tokens.shape[0]):
        ids = _node_ids(tokens, parents, context, node)
        assert torch.equal(got[node], expected(ids, scores[node: node + 1].clone())[0]), f"node {node}"
    for key in settings:  # each setting matters for some node
        alone = TargetProcessing(1.0, 0, 0, torch.tensor(eos), eos, {key: settings[key]}, max_new)
        assert not torch.equal(alone(scores.clone(), context, prompt_len, (tokens, parents, depth)), scores), key


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


PROCESSOR_CASES = {  # settings (each changes this model's greedy output: the test checks it), by name
    "no_repeat_ngram_size": lambda seq: {"no_repeat_ngram_size": 2},
    "suppress_tokens": lambda seq: {"suppress_tokens": [seq[0], seq[3]]},
    "begin_suppress_tokens": lambda seq: {"begin_suppress_tokens": [seq[0]]},
    "bad_words_ids": lambda seq: {"bad_words_ids": [[seq[2]], [seq[4], seq[5]], [seq[7], seq[8], seq[9]]]},
    "sequence_bias": lambda seq: {"sequence_bias": {(seq[1],): -5.0, (seq[3], seq[4]): -10.0, (seq[6], 3): 8.0}},
    "forced_eos_token_id": lambda seq: {"forced_eos_token_id": 5},
    "exponential_decay_length_penalty": lambda seq: {"exponential_decay_length_penalty": (3, 1.5),
                                                     "eos_token_id": seq[5]},
    "with_the_penalty": lambda seq: {"bad_words_ids": [[seq[4], seq[5]]], "repetition_penalty": PENALTY,
                                     "min_new_tokens": 4, "suppress_tokens": [seq[10]]},
}


@pytest.mark.parametrize("case", list(PROCESSOR_CASES))
def test_transformers_processors_every_policy(llama, case):
    """sequence_bias, no_repeat_ngram_size, bad_words_ids, suppress_tokens, begin_suppress_tokens,
    forced_eos_token_id and exponential_decay_length_penalty, as arguments: every policy's output equals
    target.generate's (which they change), with trees whose nodes each get their own context's processing."""
    target, draft, inputs = llama
    prompt_len = inputs["input_ids"].shape[1]
    plain = hf_greedy(target, inputs, max_new_tokens=20, eos_token_id=None)
    settings = PROCESSOR_CASES[case](plain[0, prompt_len:].tolist())
    hf_settings = {"eos_token_id": None, **settings}
    expected = hf_greedy(target, inputs, max_new_tokens=20, **hf_settings)
    assert not torch.equal(expected, plain)
    for policy in POLICIES:
        out = SpeculativeGenerator(target, draft if policy != "ar" else None, POLICIES[policy]()).generate(
            **inputs, max_new_tokens=20, **{"eos_token_id": -1, **settings})
        assert torch.equal(out.sequences, expected), policy


def test_transformers_processors_of_the_generation_config(llama):
    """The same settings in the target's generation config are applied as generate applies them."""
    target, draft, inputs = llama
    prompt_len = inputs["input_ids"].shape[1]
    seq = hf_greedy(target, inputs, max_new_tokens=20)[0, prompt_len:].tolist()
    old = _set(target.generation_config, suppress_tokens=[seq[2]], bad_words_ids=[[seq[5], seq[6]]])
    try:
        expected = hf_greedy(target, inputs, max_new_tokens=20)
        out = SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=20)
    finally:
        _set(target.generation_config, **old)
    assert torch.equal(out.sequences, expected)
    assert expected[0, prompt_len:].tolist() != seq


def test_processor_settings_as_tensors_and_arrays(llama):
    """Token lists given as a tensor or a NumPy array, as generate takes them: a one-element tensor of token 0 is set
    (it was read as False and dropped), a longer one is no truth value to test."""
    target, draft, inputs = llama
    bias = {(0,): 40.0}  # every token would be 0 without the suppression
    for suppress in (torch.tensor([0]), np.array([0]), torch.tensor([0, 53]), np.array([53, 0])):
        for key in ("suppress_tokens", "begin_suppress_tokens"):
            settings = {"sequence_bias": bias, key: suppress}
            expected = hf_greedy(target, inputs, max_new_tokens=8, eos_token_id=None, **settings)
            out = SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=8, eos_token_id=-1,
                                                                       **settings)
            assert torch.equal(out.sequences, expected), (key, suppress)


def test_bad_words_keep_generates_eos_rule(llama):
    """generate drops a banned word that is one of the EOS ids (all of them, one outside the scores included) before
    its processor checks the words against the vocabulary: so does the engine."""
    target, draft, inputs = llama
    vocab = target.config.vocab_size
    settings = {"eos_token_id": [vocab - 1, vocab + 4], "bad_words_ids": [[vocab + 4], [53]]}
    expected = hf_greedy(target, inputs, max_new_tokens=12, **settings)
    for policy in ("ar", "sage"):
        out = SpeculativeGenerator(target, draft if policy != "ar" else None, policy).generate(
            **inputs, max_new_tokens=12, **settings)
        assert torch.equal(out.sequences, expected), policy


@pytest.mark.parametrize("entry, error", [
    ({"bad_words_ids": [[-3]]}, "bad_words_ids"), ({"bad_words_ids": []}, "bad_words_ids"),
    ({"sequence_bias": {(2,): "x"}}, "sequence_bias"), ({"sequence_bias": {}}, "sequence_bias"),
    ({"suppress_tokens": [3, 7], "forced_eos_token_id": 7}, "forced_eos_token_id.*also in suppress_tokens"),
    ({"suppress_tokens": np.array([3, 7]), "forced_bos_token_id": 3}, "forced_bos_token_id.*also in suppress_tokens"),
    ({"exponential_decay_length_penalty": (2, 1.5), "eos_token_id": None}, "needs an EOS id"),
])
def test_bad_processor_values_are_refused_before_any_work(llama, entry, error):
    """What transformers' processors or generate's config check refuse (ValueError) is refused before any forward."""
    target, draft, inputs = llama
    old = _set(target.generation_config, eos_token_id=None)  # (the decay case: no EOS anywhere)
    generator = SpeculativeGenerator(target, draft, "sage")
    forwards = []
    hook = target.register_forward_hook(lambda *args: forwards.append(1))
    try:
        with pytest.raises(ValueError, match=error):
            generator.generate(**inputs, max_new_tokens=4, **entry)
    finally:
        hook.remove()
        _set(target.generation_config, **old)
    assert not forwards


def test_max_time_stops_every_row_with_a_prefix_of_the_output(llama):
    """max_time (generate's MaxTimeCriteria), as an argument or a config entry: once the generation has run that
    long, every row stops after the step that passed it (at least one token: a step's), and what it emitted is a
    prefix of the output without the limit; a long limit changes nothing."""
    target, draft, inputs = llama
    prompt_len = inputs["input_ids"].shape[1]
    full = hf_greedy(target, inputs, max_new_tokens=24, eos_token_id=None)
    generator = SpeculativeGenerator(target, draft, "sage")
    out = generator.generate(**inputs, max_new_tokens=24, eos_token_id=-1, max_time=0.0)
    new = out.sequences.shape[1] - prompt_len
    assert 1 <= new < 24 and out.stats.stop_reason == "max_time"
    assert torch.equal(out.sequences, full[:, : prompt_len + new])
    old = _set(target.generation_config, max_time=0.0)
    try:
        assert generator.generate(**inputs, max_new_tokens=24, eos_token_id=-1).stats.stop_reason == "max_time"
    finally:
        _set(target.generation_config, **old)
    assert torch.equal(generator.generate(**inputs, max_new_tokens=24, eos_token_id=-1, max_time=600.0).sequences, full)
    with pytest.raises(ValueError, match="max_time must be >= 0"):
        generator.generate(**inputs, max_new_tokens=4, max_time=-1.0)


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
    ({"token_healing": True}, {"token_healing": False}),
    ({"num_beams": 3}, {"num_beams": 1}),
    ({"guidance_scale": 1.5}, {"guidance_scale": 1.0}),
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


def test_sampling_entries_of_the_config_are_honoured_when_sampling(llama):
    """A generation config's sampling warpers (typical_p, min_p, ...) apply when sampling, as in generate; the
    call's value wins over the config's."""
    target, draft, inputs = llama
    old = _set(target.generation_config, do_sample=True, typical_p=0.5, min_p=0.05)
    try:
        generator = SpeculativeGenerator(target, draft, "sage")
        generator.generate(**inputs, max_new_tokens=6)
        warpers = {type(w).__name__: w for w in generator._active_warpers}
        assert warpers["TypicalLogitsWarper"].mass == 0.5 and warpers["MinPLogitsWarper"].min_p == 0.05
        generator.generate(**inputs, max_new_tokens=6, typical_p=0.8)
        assert {type(w).__name__: w for w in generator._active_warpers}["TypicalLogitsWarper"].mass == 0.8
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
    with pytest.raises(ValueError, match="generation config sets token_healing=True"):
        generator.generate(**inputs, generation_config=GenerationConfig(token_healing=True))
    config = GenerationConfig(max_new_tokens=12, no_repeat_ngram_size=2)  # a processor's setting in a given config
    out = generator.generate(**inputs, generation_config=config)
    assert torch.equal(out.sequences, hf_greedy(target, inputs, generation_config=config))
