"""Losslessness of the speculative engine, greedy: every family x every policy gives exactly the
tokens of ``target.generate(do_sample=False)``.

Families: tiny Llama, Qwen2, Mistral, LLaVA-1.5 (tests/tiny_models.py) and Qwen2-VL, Qwen2.5-VL,
LLaVA-OneVision, Idefics3, SmolVLM (tests/tiny_vlms.py). Drafts: a correlated draft (target + noise:
accepts and rejects), the target's own weights (everything accepted: tau must reach the depth of the
tree's greedy chain every step) and a contrary draft (negated lm_head: nothing accepted).
Edge cases: EOS inside an accepted block, stop strings, max_new_tokens reached exactly mid-block,
prompts of length 1.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_models import (  # noqa: F401  (one_thread: autouse fixture)
    all_family_builders,
    one_thread,
    contrary_draft,
    correlated_draft,
    same_draft,
    text_prompt,
    tiny_llama,
    tiny_llava,
    tiny_tokenizer,
    tokens_left,
)

from sage_ext.engine import SpeculativeGenerator
from sage_ext.engine.policies import (
    ChainPolicy,
    CostAwareSagePolicy,
    DynamicTreePolicy,
    SagePolicy,
    StaticTreePolicy,
)

BUILDERS = all_family_builders()
MAX_NEW = 24

POLICIES = {
    "ar": lambda: "ar",
    "chain": lambda: ChainPolicy(length=5),
    "static": lambda: StaticTreePolicy(),
    "dynamic": lambda: DynamicTreePolicy(depth=6, topk=8, num_nodes=64),
    "sage": lambda: SagePolicy(),
    "sage_zero_lag": lambda: SagePolicy(lag=False),
    "sage_static_shapes": lambda: SagePolicy(static_shapes=True),
    "sage_zero_lag_static_shapes": lambda: SagePolicy(lag=False, static_shapes=True),
    "sage_no_first_static": lambda: SagePolicy(first_round_paths=None, n_max=20),
    "sage_cost": lambda: CostAwareSagePolicy(),
}
SPECULATIVE = [name for name in POLICIES if name != "ar"]


def hf_greedy(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, do_sample=False, **kwargs)


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request):
    target, inputs = BUILDERS[request.param]()
    draft = correlated_draft(target, noise=0.1)
    return SimpleNamespace(name=request.param, target=target, inputs=inputs, draft=draft,
                           reference=hf_greedy(target, inputs, max_new_tokens=MAX_NEW))


def greedy_chain_depth(tokens: torch.Tensor, parents: torch.Tensor, logprobs: torch.Tensor) -> int:
    """Depth reached by following, from the root, the child with the highest draft log-prob (the draft's
    greedy token: every policy includes rank 0 among a node's children whenever the node has any)."""
    if parents.shape[1] == 1:  # the root alone (the generation's last token): no draft, no log-probs
        return 0
    parents_list, logprobs_list = parents[0].tolist(), logprobs[0].tolist()
    node, depth = 0, 0
    while True:
        children = [i for i, p in enumerate(parents_list) if p == node and i > 0]
        if not children:
            return depth
        node = max(children, key=lambda c: logprobs_list[c])
        depth += 1


@pytest.mark.parametrize("policy", list(POLICIES))
def test_greedy_equals_target_generate(family, policy):
    generator = SpeculativeGenerator(family.target, family.draft, POLICIES[policy]())
    out = generator.generate(**family.inputs, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, family.reference)
    assert out.stats.new_tokens == MAX_NEW
    if policy != "ar":
        taus = [step.tau for step in out.stats.steps]
        assert max(taus) > 0, "the correlated draft should get tokens accepted"
    if policy == "chain":
        assert any(step.tau < step.tree_depth for step in out.stats.steps), "and rejected sometimes"


@pytest.mark.parametrize("policy", SPECULATIVE)
def test_identical_draft_accepts_the_whole_greedy_chain(family, policy):
    generator = SpeculativeGenerator(family.target, same_draft(family.target), POLICIES[policy]())
    seen = []

    def check(info):
        expected = greedy_chain_depth(info.tree_tokens, info.tree_parents, info.tree_logprobs)
        seen.append((info.tau, expected))

    generator.step_hook = check
    out = generator.generate(**family.inputs, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, family.reference)
    assert seen and all(tau == expected for tau, expected in seen), seen
    if policy in ("chain", "static"):  # the whole depth 5 every step, but never past max_new_tokens
        assert [step.tau for step in out.stats.steps] == [min(5, left - 1) for left in tokens_left(out.stats, MAX_NEW)]


@pytest.mark.parametrize("policy", SPECULATIVE)
def test_contrary_draft_accepts_nothing(family, policy):
    generator = SpeculativeGenerator(family.target, contrary_draft(family.target), POLICIES[policy]())
    out = generator.generate(**family.inputs, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, family.reference)
    assert all(step.tau == 0 for step in out.stats.steps)
    assert out.stats.target_forwards == MAX_NEW - 1  # one token per forward, the first from the prefill


def _inside_block_positions(stats) -> list[int]:
    """Generated-token indices that are not the last token of their step's block (index 0 is the
    prefill's token)."""
    inside, index = [], 1
    for step in stats.steps:
        inside += list(range(index, index + step.emitted - 1))
        index += step.emitted
    return inside


@pytest.mark.parametrize("policy", ["chain", "static", "dynamic", "sage", "sage_static_shapes"])
def test_eos_inside_an_accepted_block(family, policy):
    draft = same_draft(family.target)
    prompt_len = family.inputs["input_ids"].shape[1]
    free_run = SpeculativeGenerator(family.target, draft, POLICIES[policy]()).generate(
        **family.inputs, max_new_tokens=MAX_NEW, eos_token_id=-1)
    generated = free_run.sequences[0, prompt_len:].tolist()
    # first occurrence of a token, strictly inside a block: becomes the EOS
    candidates = [i for i in _inside_block_positions(free_run.stats) if generated[i] not in generated[:i]]
    assert candidates
    eos = generated[candidates[0]]
    reference = hf_greedy(family.target, family.inputs, max_new_tokens=MAX_NEW, eos_token_id=eos)
    out = SpeculativeGenerator(family.target, draft, POLICIES[policy]()).generate(
        **family.inputs, max_new_tokens=MAX_NEW, eos_token_id=[eos])
    assert torch.equal(out.sequences, reference)
    assert out.sequences[0, -1].item() == eos and out.stats.stop_reason == "eos"
    last = out.stats.steps[-1]
    assert last.emitted < last.tau + 1, "the EOS should cut an accepted block"


def test_eos_is_read_from_the_generation_config_only():
    """``generate`` stops at the generation config's EOS ids alone: with none there it runs to max_new_tokens even when
    the model config names an EOS the output holds; so does the engine. An EOS given as a tensor is read as a list."""
    target, inputs = tiny_llama()
    draft = correlated_draft(target, noise=0.1)
    prompt_len = inputs["input_ids"].shape[1]
    free = hf_greedy(target, inputs, max_new_tokens=MAX_NEW, eos_token_id=-1)[0, prompt_len:].tolist()
    eos = next(token for i, token in enumerate(free) if i >= 3 and token not in free[:i])
    target.config.eos_token_id = eos
    target.generation_config.eos_token_id = None
    reference = hf_greedy(target, inputs, max_new_tokens=MAX_NEW)
    assert reference.shape[1] == prompt_len + MAX_NEW
    out = SpeculativeGenerator(target, draft, "sage").generate(**inputs, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, reference)
    stopped = SpeculativeGenerator(target, draft, "sage").generate(
        **inputs, max_new_tokens=MAX_NEW, eos_token_id=torch.tensor([eos, 10**6]))
    assert torch.equal(stopped.sequences, hf_greedy(target, inputs, max_new_tokens=MAX_NEW, eos_token_id=eos))


@pytest.mark.parametrize("static_shapes", [False, True])
def test_a_chain_that_reaches_eos_is_not_drafted_past_it(family, static_shapes):
    """Whatever follows an accepted EOS is dropped, so with dynamic shapes (each level's count read) a level whose
    nodes are all EOS is not fed to the draft: a chain that proposes EOS at depth e costs e draft forwards (the root's
    and e - 1 levels'), not the chain's length. Static shapes read nothing mid-step and draft the whole chain. Both
    are lossless."""
    draft, length = same_draft(family.target), 8

    def chain():  # SAGE's levels shaped as an 8-token chain (width 1, no threshold), as sage_cost's chains are
        return SagePolicy(d_min=length, d_max=length, d_max_cap=length, w_min=1, w_max=1, theta_scale=1e-9,
                          first_round_paths=None, static_shapes=static_shapes)

    prompt_len = family.inputs["input_ids"].shape[1]
    free_run = SpeculativeGenerator(family.target, draft, chain()).generate(
        **family.inputs, max_new_tokens=MAX_NEW, eos_token_id=-1)
    assert all(step.tau == length for step in free_run.stats.steps[:-1])  # the draft is the target: all accepted
    generated = free_run.sequences[0, prompt_len:].tolist()
    # a token first generated at a chain depth below the last (index 0 is the prefill's token; step j's chain holds
    # the indices 1 + (length + 1) j .. (length + 1) (j + 1) - 1, its bonus token the next)
    candidates = [i for i in range(1, len(generated)) if (i - 1) % (length + 1) < length - 1
                  and generated[i] not in generated[:i]]
    assert candidates
    eos = generated[candidates[0]]
    depth = (candidates[0] - 1) % (length + 1) + 1
    reference = hf_greedy(family.target, family.inputs, max_new_tokens=MAX_NEW, eos_token_id=eos)
    out = SpeculativeGenerator(family.target, draft, chain()).generate(
        **family.inputs, max_new_tokens=MAX_NEW, eos_token_id=eos)
    assert torch.equal(out.sequences, reference) and out.stats.stop_reason == "eos"
    last = out.stats.steps[-1]
    assert last.emitted == depth < length
    assert last.draft_forwards == (length if static_shapes else depth)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_llava])
@pytest.mark.parametrize("policy", ["static", "sage", "dynamic"])
def test_stop_strings(builder, policy):
    target, inputs = builder()
    draft = same_draft(target)
    tokenizer = tiny_tokenizer()
    prompt_len = inputs["input_ids"].shape[1]
    free_run = SpeculativeGenerator(target, draft, POLICIES[policy]()).generate(**inputs, max_new_tokens=MAX_NEW)
    generated = free_run.sequences[0, prompt_len:].tolist()
    text = tokenizer.decode(generated)
    # a two-character stop string ending strictly inside a block, not occurring earlier
    index = next(i for i in _inside_block_positions(free_run.stats)
                 if i >= 1 and text[i - 1 : i + 1] not in text[: i])
    stop = text[index - 1 : index + 1]
    reference = hf_greedy(target, inputs, max_new_tokens=MAX_NEW, stop_strings=[stop], tokenizer=tokenizer)
    out = SpeculativeGenerator(target, draft, POLICIES[policy]()).generate(
        **inputs, max_new_tokens=MAX_NEW, stop_strings=stop, tokenizer=tokenizer)
    assert torch.equal(out.sequences, reference)
    assert out.stats.stop_reason == "stop_string"
    assert out.sequences.shape[1] == prompt_len + index + 1


@pytest.mark.parametrize("builder", [tiny_llama, tiny_llava])
@pytest.mark.parametrize("max_new_tokens", [1, 2, 7, 13])
@pytest.mark.parametrize("policy", ["chain", "static", "sage", "sage_static_shapes", "dynamic", "sage_cost"])
def test_max_new_tokens_is_exact(builder, max_new_tokens, policy):
    target, inputs = builder()
    reference = hf_greedy(target, inputs, max_new_tokens=max_new_tokens)
    out = SpeculativeGenerator(target, same_draft(target), POLICIES[policy]()).generate(
        **inputs, max_new_tokens=max_new_tokens)
    assert torch.equal(out.sequences, reference)
    assert out.stats.new_tokens == max_new_tokens
    # no level is drafted past the end: a tree d deep emits at most d + 1 tokens, so with r tokens left a step's
    # tree is at most r - 1 deep, and the root alone (no draft forward) when one token is left
    for step, left in zip(out.stats.steps, tokens_left(out.stats, max_new_tokens)):
        assert step.tree_depth <= left - 1, (step, left)
        if left == 1:
            assert step.draft_forwards == 0 and step.tree_size == 0, step  # (tree_size: draft nodes)


@pytest.mark.parametrize("family_name", ["llama", "qwen2", "mistral", "llava"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_prompt_of_length_one(family_name, policy):
    target, _ = BUILDERS[family_name]()
    inputs = text_prompt(1, seed=3)  # LLaVA without an image is a plain Llama prompt
    reference = hf_greedy(target, inputs, max_new_tokens=MAX_NEW)
    draft = correlated_draft(target, noise=0.1)
    out = SpeculativeGenerator(target, draft, POLICIES[policy]()).generate(**inputs, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, reference)


@pytest.mark.parametrize("policy", ["chain", "static", "dynamic", "sage"])
def test_small_draft_of_another_size(policy):
    target, inputs = tiny_llava()
    draft, _ = tiny_llava(seed=5, small=True)
    reference = hf_greedy(target, inputs, max_new_tokens=MAX_NEW)
    out = SpeculativeGenerator(target, draft, POLICIES[policy]()).generate(**inputs, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, reference)
