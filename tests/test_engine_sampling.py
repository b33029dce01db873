"""Sampling is lossless: the engine's tokens are distributed exactly like the target's own sampling.

Tiny vocabulary (24 tokens), fixed prompt. The exact distributions of the 2nd and 3rd new tokens (the
1st comes straight from the target's prefill; later ones go through tree verification) are computed by
enumerating every prefix with batched target forwards and the same HF logits warpers; the engine's
empirical frequencies over a few thousand seeded runs must pass a chi-square test (p > 1e-3). The
negative control — a verifier that forgets to remove a rejected draft token from the residual
distribution — must fail it (p < 1e-6), so the test has the power to see a real bias.

With a repetition penalty, the same check with transformers' processor applied to every enumerated continuation.

One vision-language case: Qwen3-VL (image prompt, M-RoPE, DeepStack) with the same 24-token vocabulary; its exact
marginals come from the model's own cached decoding after its own prompt forward (fewer runs: each costs more).
"""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare
from tiny_models import correlated_draft, one_thread, tiny_llama  # noqa: F401  (one_thread: autouse fixture)
from tiny_vlms_more import tiny_qwen3_vl
from transformers import DynamicCache, GenerationConfig

from sage_ext.engine import SpeculativeGenerator
from sage_ext.engine.costs import ProposalChoice
from sage_ext.engine.policies import ChainPolicy, CostAwareSagePolicy, DynamicTreePolicy, SagePolicy, StaticTreePolicy

VOCAB = 24
RUNS = 3000
P_PASS = 1e-3
P_BROKEN = 1e-6


@pytest.fixture(scope="module")
def setup():
    target, _ = tiny_llama(seed=0, vocab_size=VOCAB)
    draft = correlated_draft(target, noise=0.3)  # accepts about a token per step: both branches run
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    return target, draft, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}


def exact_marginals(target, inputs, warp, processor=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact distributions of the 2nd and 3rd new token under the target's sampling; ``processor``: a transformers
    logits processor applied before the warpers (as generate applies it), given each continuation's whole ids."""
    prompt = inputs["input_ids"]
    vocab = torch.arange(VOCAB)

    def scores(ids):
        logits = target(input_ids=ids).logits[:, -1].float()
        return warp(logits if processor is None else processor(ids, logits))

    with torch.no_grad():
        first = scores(prompt)[0]  # [V]
        one = torch.cat((prompt.expand(VOCAB, -1), vocab[:, None]), dim=1)
        second = scores(one)  # [V, V]: row t1
        two = torch.cat((one.repeat_interleave(VOCAB, 0), vocab.repeat(VOCAB)[:, None]), dim=1)
        third = scores(two)  # [V*V, V]: row (t1, t2)
    p2 = first @ second
    p3 = (first[:, None] * second).reshape(-1) @ third
    return p2.double(), p3.double()


def chi_square_p(samples: list[int], probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; cells expected below 5 counts are pooled into one."""
    counts = torch.bincount(torch.tensor(samples), minlength=VOCAB).double()
    expected = probs * len(samples)
    small = expected < 5
    observed_cells = torch.cat((counts[~small], counts[small].sum().view(1)))
    expected_cells = torch.cat((expected[~small], expected[small].sum().view(1)))
    keep = expected_cells > 0
    observed_cells, expected_cells = observed_cells[keep], expected_cells[keep]
    expected_cells *= observed_cells.sum() / expected_cells.sum()  # exact float normalisation
    return float(chisquare(observed_cells.numpy(), expected_cells.numpy()).pvalue)


def sample_tokens(generator_obj, inputs, runs: int = RUNS, **kwargs) -> tuple[list[int], list[int], float]:
    rng = torch.Generator().manual_seed(1234)
    prompt_len = inputs["input_ids"].shape[1]
    second, third, taus = [], [], []
    for _ in range(runs):
        # 4 tokens: the first step's tree may be 2 deep (none deeper than the tokens left), so the 3rd token can be
        # a draft token accepted at depth 2 or the residual's sample there
        out = generator_obj.generate(**inputs, max_new_tokens=4, do_sample=True, eos_token_id=-1,
                                     generator=rng, **kwargs)
        second.append(int(out.sequences[0, prompt_len + 1]))
        third.append(int(out.sequences[0, prompt_len + 2]))
        taus += [step.tau for step in out.stats.steps if step.draft_forwards > 0]  # (not a last step: the root alone)
    return second, third, sum(taus) / len(taus)


WARPER_SETTINGS = ("temperature", "top_h", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def hf_warpers(target, **kwargs) -> list:
    """transformers' own sampling warpers for the sampling settings among ``kwargs`` (``generate``'s processor list,
    built by the model itself; top_k 50 when not given, as generate's default)."""
    settings = {key: value for key, value in kwargs.items() if key in WARPER_SETTINGS}
    config = GenerationConfig(do_sample=True, **{"top_k": 50, **settings})
    return list(target._get_logits_processor(generation_config=config, device="cpu"))


def hf_warper(target, **kwargs):
    """The target's sampling distribution of a row of logits under ``kwargs`` (``hf_warpers``, then softmax)."""
    warpers = hf_warpers(target, **kwargs)

    def warp(logits):
        scores = logits.float()
        for warper in warpers:
            scores = warper(None, scores)
        return torch.softmax(scores, dim=-1)

    return warp


SETTINGS = {  # name: (policy, sampling settings, sampling rule)
    "chain": (lambda: ChainPolicy(length=4), {"temperature": 2.0, "top_k": 0}, "specinfer"),
    "static": (StaticTreePolicy, {"temperature": 2.0, "top_k": 0}, "specinfer"),
    "dynamic": (lambda: DynamicTreePolicy(depth=4, topk=4, num_nodes=16), {"temperature": 2.0, "top_k": 0}, "specinfer"),
    "sage": (SagePolicy, {"temperature": 2.0, "top_k": 0}, "specinfer"),
    "sage_top_k_top_p": (SagePolicy, {"temperature": 1.5, "top_k": 8, "top_p": 0.9}, "specinfer"),
    "chain_traversal": (lambda: ChainPolicy(length=4), {"temperature": 2.0, "top_k": 0}, "traversal"),
    "static_traversal": (StaticTreePolicy, {"temperature": 2.0, "top_k": 0}, "traversal"),
    "sage_traversal_top_k_top_p": (SagePolicy, {"temperature": 1.5, "top_k": 8, "top_p": 0.9}, "traversal"),
    "chain_gumbel": (lambda: ChainPolicy(length=4), {"temperature": 2.0, "top_k": 0}, "gumbel"),
    "static_gumbel": (StaticTreePolicy, {"temperature": 2.0, "top_k": 0}, "gumbel"),
    "sage_gumbel_top_k_top_p": (SagePolicy, {"temperature": 1.5, "top_k": 8, "top_p": 0.9}, "gumbel"),
    # the other warpers generate samples with (each changes this model's distributions: test_the_warpers_matter)
    "sage_min_p_typical_p": (SagePolicy, {"temperature": 1.5, "top_k": 0, "min_p": 0.1, "typical_p": 0.9}, "specinfer"),
    "static_top_h_epsilon_eta": (StaticTreePolicy, {"temperature": 2.0, "top_k": 0, "top_h": 0.8,
                                                    "epsilon_cutoff": 0.02, "eta_cutoff": 0.02}, "gumbel"),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampled_tokens_follow_the_target_distribution(setup, name):
    target, draft, inputs = setup
    make_policy, kwargs, rule = SETTINGS[name]
    engine = SpeculativeGenerator(target, draft, make_policy(), sampling_rule=rule)
    p2, p3 = exact_marginals(target, inputs, hf_warper(target, **kwargs))
    second, third, mean_tau = sample_tokens(engine, inputs, **kwargs)
    assert mean_tau > 0.3, "the draft should get tokens accepted"
    assert chi_square_p(second, p2) > P_PASS
    assert chi_square_p(third, p3) > P_PASS


def test_the_engine_samples_with_generates_warpers(setup):
    """Every sampling setting generate honours gives the engine transformers' own warpers, in generate's order and
    under its conditions (a cutoff of 0 or a typical_p of 1 applies none), and they warp every node's scores alike."""
    target, draft, inputs = setup
    engine = SpeculativeGenerator(target, draft, SagePolicy())
    scores = torch.randn(9, VOCAB, generator=torch.Generator().manual_seed(5)) * 3
    for kwargs in ({"temperature": 0.7, "top_h": 0.6, "top_k": 5, "top_p": 0.8, "min_p": 0.02, "typical_p": 0.95,
                    "epsilon_cutoff": 0.001, "eta_cutoff": 0.001},
                   {"min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 1.0, "top_k": 0},
                   {"temperature": 1.2, "typical_p": 0.5}, {"top_h": 1.0, "top_p": 1.0}):
        engine.generate(**inputs, max_new_tokens=2, do_sample=True, **kwargs)
        expected = hf_warpers(target, **kwargs)
        assert [type(w) for w in engine._active_warpers] == [type(w) for w in expected], kwargs
        ours, theirs = scores.clone(), scores.clone()
        for mine, hf in zip(engine._active_warpers, expected):
            ours, theirs = mine(None, ours), hf(None, theirs)
        assert torch.equal(ours, theirs), kwargs


@pytest.mark.parametrize("name", ["sage_min_p_typical_p", "static_top_h_epsilon_eta"])
def test_the_warpers_matter(setup, name):
    """The statistical settings of the newer warpers are not vacuous: each warper alone changes the 2nd token's
    distribution from the temperature-only one."""
    target, _, inputs = setup
    kwargs = SETTINGS[name][1]
    base = {key: kwargs[key] for key in ("temperature", "top_k")}
    p2_base, _ = exact_marginals(target, inputs, hf_warper(target, **base))
    for key in kwargs.keys() - base.keys():
        p2, _ = exact_marginals(target, inputs, hf_warper(target, **base, **{key: kwargs[key]}))
        assert (p2 - p2_base).abs().sum() > 0.02, key


@pytest.mark.parametrize("kwargs, error", [({"min_p": 1.5}, "min_p"), ({"typical_p": -0.5}, "typical_p"),
                                           ({"top_h": 0.0}, "top_h"), ({"min_p": "0.1"}, "min_p must be a number")])
def test_bad_warper_values_are_refused_before_any_work(setup, kwargs, error):
    target, draft, inputs = setup
    with pytest.raises((ValueError, TypeError), match=error):
        SpeculativeGenerator(target, draft, SagePolicy()).generate(**inputs, max_new_tokens=2, do_sample=True, **kwargs)


def _penalty():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    return {"repetition_penalty": 2.0}, RepetitionPenaltyLogitsProcessor(2.0)


def _banned_bigrams_and_bias():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        NoBadWordsLogitsProcessor,
        SequenceBiasLogitsProcessor,
    )

    bad_words = [[token, banned] for token in range(12) for banned in (7, 9)]
    bias = {(token, 3): 4.0 for token in range(12, VOCAB)}
    return ({"bad_words_ids": bad_words, "sequence_bias": bias},
            LogitsProcessorList([SequenceBiasLogitsProcessor(bias), NoBadWordsLogitsProcessor(bad_words)]))


CONTEXT_PROCESSING = {  # name: (settings and transformers' processors for them, sampling rule)
    "penalty_specinfer": (_penalty, "specinfer"),
    "penalty_traversal": (_penalty, "traversal"),
    "penalty_gumbel": (_penalty, "gumbel"),
    "banned_bigrams_and_bias_specinfer": (_banned_bigrams_and_bias, "specinfer"),
}


@pytest.mark.parametrize("name", list(CONTEXT_PROCESSING))
def test_sampling_with_context_dependent_processing_follows_the_target_distribution(setup, name):
    """Processing that reads each node's own context (tests/test_generation_config.py) under sampling: the repetition
    penalty, banned bigrams and a bigram bias (transformers' NoBadWords and SequenceBias processors, which read a
    continuation's last token); the marginals of the 2nd and 3rd token with transformers' processors applied to
    every continuation."""
    make, rule = CONTEXT_PROCESSING[name]
    settings, processors = make()
    target, draft, inputs = setup
    engine = SpeculativeGenerator(target, draft, SagePolicy(), sampling_rule=rule)
    warp = hf_warper(target, temperature=1.5, top_k=0)
    p2, p3 = exact_marginals(target, inputs, warp, processors)
    free2, free3 = exact_marginals(target, inputs, warp)
    assert (p2 - free2).abs().sum() > 0.1 and (p3 - free3).abs().sum() > 0.1  # the processing matters here
    second, third, mean_tau = sample_tokens(engine, inputs, temperature=1.5, top_k=0, **settings)
    assert mean_tau > 0.3, "the draft should get tokens accepted"
    assert chi_square_p(second, p2) > P_PASS
    assert chi_square_p(third, p3) > P_PASS


@pytest.mark.parametrize("rule", ["specinfer", "gumbel"])
@pytest.mark.parametrize("policy", ["ar", "chain", "sage"])
def test_nan_probabilities_after_the_prompt_raise_as_in_transformers(policy, rule):
    """The target's logits turn NaN after the prompt (as a float16 overflow would): transformers' sampling raises
    at the second token, and so does the engine (the verify ops then return bonus -1; it emitted token 0 before)."""
    target, inputs = tiny_llama(seed=0)
    forwards = [0]

    def nan_after_the_prompt(module, args, out):  # the prompt forward is the first of each generation
        forwards[0] += 1
        return out if forwards[0] == 1 else torch.full_like(out, float("nan"))

    hook = target.lm_head.register_forward_hook(nan_after_the_prompt)
    try:
        with pytest.raises(RuntimeError, match="probability tensor contains either"):
            target.generate(**inputs, do_sample=True, max_new_tokens=4)
        forwards[0] = 0
        engine = SpeculativeGenerator(target, correlated_draft(target, noise=0.1) if policy != "ar" else None, policy,
                                      sampling_rule=rule)
        with pytest.raises(RuntimeError, match="sampling probabilities after the accepted tokens hold inf or nan"):
            engine.generate(**inputs, do_sample=True, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()


class ResidualNotUpdated(SpeculativeGenerator):
    """Broken on purpose: after rejecting a draft token it keeps sampling from the unmodified target
    distribution, so a rejected token can come back as the bonus (over-represented)."""

    def _verify_sampling(self, tokens, parents, probs, generator):
        parents_list, tokens_list = parents[0].tolist(), tokens[0].tolist()
        uniforms = torch.rand(len(parents_list), generator=generator).tolist()
        node, path = 0, [0]
        while True:
            p = probs[0, node].double()
            children = [c for c in range(1, len(parents_list)) if parents_list[c] == node]
            accepted = next((c for c in children if uniforms[c] < p[tokens_list[c]] / p.sum()), None)
            if accepted is None:
                break
            node = accepted
            path.append(node)
        bonus = int(torch.multinomial(p, 1, generator=generator))
        accepted_idx = torch.full((1, len(parents_list)), -1, dtype=torch.int64)
        accepted_idx[0, : len(path)] = torch.tensor(path)
        return accepted_idx, torch.tensor([len(path) - 1]), torch.tensor([bonus])


def test_negative_control_biased_verifier_is_detected(setup):
    target, draft, inputs = setup
    kwargs = {"temperature": 2.0, "top_k": 0}
    engine = ResidualNotUpdated(target, draft, StaticTreePolicy())
    p2, p3 = exact_marginals(target, inputs, hf_warper(target, **kwargs))
    second, third, _ = sample_tokens(engine, inputs, **kwargs)
    assert min(chi_square_p(second, p2), chi_square_p(third, p3)) < P_BROKEN


def test_negative_control_uniform_instead_of_gumbel_noise_is_detected(setup, monkeypatch):
    """The "gumbel" rule broken on purpose: the uniform draw added as it is, its -log(-log u) transform forgotten
    (every token then leans to the target's most likely one)."""
    from sage_ext.engine import coupled

    target, draft, inputs = setup
    kwargs = {"temperature": 2.0, "top_k": 0}
    monkeypatch.setattr(coupled, "gumbel_noise", lambda uniform: uniform)
    engine = SpeculativeGenerator(target, draft, StaticTreePolicy(), sampling_rule="gumbel")
    p2, p3 = exact_marginals(target, inputs, hf_warper(target, **kwargs))
    second, third, _ = sample_tokens(engine, inputs, **kwargs)
    assert min(chi_square_p(second, p2), chi_square_p(third, p3)) < P_BROKEN


def test_an_unknown_sampling_rule_is_refused(setup):
    target, draft, _ = setup
    with pytest.raises(ValueError, match="sampling_rule must be one of specinfer, traversal, gumbel"):
        SpeculativeGenerator(target, draft, "sage", sampling_rule="typical")


def test_position_noise_is_one_draw_per_index_whatever_is_asked():
    """PositionNoise's ring gives index s the s-th draw of the row's generator, however the steps ask for it (windows
    of changing depth, indices committed one or many at a time, a window larger than the ring so it grows), and
    each node reads the row of the index it predicts (padding depths clamped into the window)."""
    from sage_ext.engine.coupled import PositionNoise, gumbel_noise

    vocab, start = 7, 5
    stream = torch.Generator().manual_seed(3)
    tiny, almost_one = torch.finfo(torch.float32).tiny, 1.0 - torch.finfo(torch.float32).eps
    expected = torch.stack([gumbel_noise(torch.rand(vocab, generator=stream).clamp_(tiny, almost_one))
                            for _ in range(80)])
    noise = PositionNoise(torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(noise.at(start, vocab), expected[0])
    index = start + 1
    # each step commits at most what the previous one drew (the bonus included), as the engine does
    for committed, count in [(0, 3), (3, 9), (0, 4), (4, 20), (3, 33), (1, 2), (2, 12)]:
        index += committed
        depths = torch.tensor([0, count - 1, count + 4, -1, count // 2])
        got = noise.for_nodes(index, depths, count, vocab)
        want = expected[index - start + depths.clamp(0, count - 1)]
        assert torch.equal(got, want), (index, count)
    assert noise.table.shape[0] == 64  # grew past 16 and 32 for the 33-index window


@pytest.mark.parametrize("batch", [False, True])
def test_gumbel_sampled_tokens_do_not_depend_on_the_trees(setup, batch):
    """sampling_rule "gumbel": the token of each sequence index is fixed by its own noise before any tree is
    verified, so a seeded call gives the same tokens with every policy (ar included) and with sage_cost whatever it
    learned in earlier calls; another seed gives others. A batch's rows each have their own stream."""
    target, draft, inputs = setup
    if batch:
        other = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(9))
        inputs = {"input_ids": torch.cat([inputs["input_ids"], other]),
                  "attention_mask": torch.ones(2, 6, dtype=torch.int64)}

    def run(policy, seed=7, engine=None):
        engine = engine or SpeculativeGenerator(target, draft if policy != "ar" else None, policy,
                                                sampling_rule="gumbel")
        return engine.generate(**inputs, max_new_tokens=24, do_sample=True, temperature=1.5, top_k=0,
                               eos_token_id=-1, generator=torch.Generator().manual_seed(seed)).sequences

    expected = run("ar")
    for policy in ("chain", "static", "dynamic", "sage", "sage_cost"):
        assert torch.equal(run(policy), expected), policy
    learning = SpeculativeGenerator(target, draft, "sage_cost", sampling_rule="gumbel")
    for _ in range(3):  # its trees change as it learns; its tokens do not
        assert torch.equal(run(None, engine=learning), expected)
    assert not torch.equal(run("sage", seed=8), expected)
    if batch:
        assert not torch.equal(expected[0, 6:], expected[1, 6:])
    else:  # sage_cost's steps of the target alone between drafted ones (a fixed plan): the same tokens again
        policy = CostAwareSagePolicy()
        plan = iter([ProposalChoice.ALONE] * 3 + [0, 4] + [ProposalChoice.ALONE] * 5 + [0])
        policy.learned.proposals.next_length = lambda limit: (max(-1, min(next(plan, 0), limit)), False)
        assert torch.equal(run(policy), expected)
        assert next(plan, None) is None  # (every planned step ran)


@pytest.mark.parametrize("rule", ["specinfer", "gumbel"])
def test_num_return_sequences_follow_the_target_distribution(setup, rule):
    """num_return_sequences samples per prompt, as generate gives them: every returned row is an independent sample
    of the target's distribution (the 2nd and 3rd tokens over all rows of all calls pass the chi-square test)."""
    target, draft, inputs = setup
    kwargs = {"temperature": 2.0, "top_k": 0}
    engine = SpeculativeGenerator(target, draft, SagePolicy(), sampling_rule=rule)
    p2, p3 = exact_marginals(target, inputs, hf_warper(target, **kwargs))
    rng, prompt_len, second, third = torch.Generator().manual_seed(99), inputs["input_ids"].shape[1], [], []
    for _ in range(RUNS // 4):
        out = engine.generate(**inputs, max_new_tokens=4, do_sample=True, eos_token_id=-1, num_return_sequences=4,
                              generator=rng, **kwargs)  # (4 tokens: the 3rd may be accepted at depth 2)
        assert out.sequences.shape == (4, prompt_len + 4) and len(out.stats) == 4
        second += out.sequences[:, prompt_len + 1].tolist()
        third += out.sequences[:, prompt_len + 2].tolist()
    assert chi_square_p(second, p2) > P_PASS
    assert chi_square_p(third, p3) > P_PASS


def test_num_return_sequences_layout_as_generate(setup):
    """A batch's prompts each repeated num_return_sequences times in a row (generate's layout: [B * n, ...]); with
    top-k 1 every sample is generate's own; greedy decoding refuses n > 1 as generate does, and a streamer takes one
    sequence only."""
    target, draft, inputs = setup
    other = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": torch.cat([inputs["input_ids"], torch.cat([torch.zeros(1, 2, dtype=torch.int64), other], 1)]),
             "attention_mask": torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])}
    engine = SpeculativeGenerator(target, draft, SagePolicy())
    settings = dict(max_new_tokens=6, do_sample=True, top_k=1, eos_token_id=-1, pad_token_id=0)
    out = engine.generate(**batch, **settings, num_return_sequences=3, generator=torch.Generator().manual_seed(0))
    assert out.sequences.shape[0] == 6 and len(out.stats) == 6
    assert torch.equal(out.sequences[:, :6], batch["input_ids"].repeat_interleave(3, dim=0))
    alone = [engine.generate(input_ids=row, max_new_tokens=6, do_sample=True, top_k=1,
                             eos_token_id=-1).sequences[0, -6:] for row in (inputs["input_ids"], other)]
    for index in range(6):
        assert torch.equal(out.sequences[index, 6:], alone[index // 3]), index
    with torch.no_grad():
        expected = target.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=2)
    got = engine.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=2)
    assert torch.equal(got.sequences, expected)
    with pytest.raises(ValueError, match="num_return_sequences=2 needs do_sample=True"):
        engine.generate(**inputs, max_new_tokens=4, num_return_sequences=2)
    with pytest.raises(ValueError, match="a streamer takes one sequence"):
        engine.generate(**inputs, max_new_tokens=4, do_sample=True, num_return_sequences=2, streamer=object())


def test_seeded_sampling_repeats_exactly(setup):
    target, draft, inputs = setup
    engine = SpeculativeGenerator(target, draft, "sage")
    runs = [engine.generate(**inputs, max_new_tokens=20, do_sample=True, eos_token_id=-1,
                            generator=torch.Generator().manual_seed(seed)).sequences for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


# ------------------------------------------------------------------------------------------- a vision-language model
VLM_RUNS = 1000  # ~40 ms per generate on one thread; the text-only cases above carry the power check


def cached_distributions(target, inputs, warp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``exact_marginals``' three distributions (first ``[V]``, second ``[V, V]`` by t1, third ``[V*V, V]`` by
    (t1, t2)) for a multimodal prompt: the prompt forward is the model's own (it computes its positions and keeps
    its rope deltas), then every one- and two-token continuation is decoded on copies of its cache, at the
    positions the model derives itself for cached decoding."""
    vocab = torch.arange(VOCAB)
    with torch.no_grad():
        cache = DynamicCache(config=target.config)
        first = warp(target(**inputs, cache=cache, use_cache=True).logits[:, -1])[0]
        cache.batch_repeat_interleave(VOCAB)
        second = warp(target(input_ids=vocab[:, None], cache=cache, use_cache=True).logits[:, -1])
        cache.batch_repeat_interleave(VOCAB)
        third = warp(target(input_ids=vocab.repeat(VOCAB)[:, None], cache=cache, use_cache=True).logits[:, -1])
    return first, second, third


def test_sampled_tokens_follow_the_target_distribution_qwen3_vl():
    target, inputs = tiny_qwen3_vl(vocab_size=VOCAB, grid_thw=(1, 4, 6), question_len=4)
    kwargs = {"temperature": 2.0, "top_k": 0}
    engine = SpeculativeGenerator(target, correlated_draft(target, noise=0.3), StaticTreePolicy())
    warp = hf_warper(target, **kwargs)
    first, second, third = cached_distributions(target, inputs, warp)

    # the oracle against the model's uncached forward of the prompt + two text tokens (t1, t2) = (1, 2), at the
    # positions the model computes for the whole sequence
    extended = torch.cat((inputs["input_ids"], torch.tensor([[1, 2]])), dim=1)
    with torch.no_grad():
        full = target(**{**inputs, "input_ids": extended, "attention_mask": torch.ones_like(extended),
                         "mm_token_type_ids": torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, 2))}).logits
    torch.testing.assert_close(warp(full[:, -3])[0], first)
    torch.testing.assert_close(warp(full[:, -2])[0], second[1])
    torch.testing.assert_close(warp(full[:, -1])[0], third[1 * VOCAB + 2])

    p2 = (first @ second).double()
    p3 = ((first[:, None] * second).reshape(-1) @ third).double()
    samples_2, samples_3, mean_tau = sample_tokens(engine, inputs, runs=VLM_RUNS, **kwargs)
    assert mean_tau > 0.3, "the draft should get tokens accepted"
    assert chi_square_p(samples_2, p2) > P_PASS
    assert chi_square_p(samples_3, p3) > P_PASS
