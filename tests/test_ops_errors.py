"""Bad input to every op raises RuntimeError/ValueError whose message names the offending argument.

Device mismatches need a second device and are covered in test_ops_cuda.py.
"""
import math
import re

import pytest
import torch

from sage_ext import ops

i64 = torch.int64


def tree(n=4):
    return torch.tensor([[-1] + list(range(n - 1))])  # a chain


def expand_args(**changes):
    """Valid expand_tree arguments (B=1, Ncap=6, F=2, K=3), with some replaced."""
    args = dict(
        tokens=torch.zeros(1, 6, dtype=i64),
        parents=torch.full((1, 6), -1, dtype=i64),
        logprobs=torch.zeros(1, 6),
        cum_logprobs=torch.zeros(1, 6),
        frontier=torch.tensor([[0, -1]]),
        topk_logprobs=torch.full((1, 2, 3), -1.0),
        topk_ids=torch.zeros(1, 2, 3, dtype=i64),
        widths=torch.ones(1, 2, dtype=i64),
        min_cum_logprob=torch.tensor([-5.0]),
        slot_start=1,
        num_slots=3,
    )
    args.update(changes)
    return args


def sampling_args(**changes):
    args = dict(tokens=torch.tensor([[0, 1, 2]]), parents=torch.tensor([[-1, 0, 0]]),
                target_probs=torch.full((1, 3, 5), 0.2), draft_probs=None)
    args.update(changes)
    return args


def call_sage_tree(**changes):
    args = dict(alpha=torch.tensor([0.5]), frontier_logprobs=torch.zeros(1, 2), level=1, k=10, d_min=3.0, d_max=8.0,
                w_min=2.0, w_max=10.0, theta_scale=0.1)
    args.update(changes)
    return ops.sage_tree(**args)


def level_args(**changes):
    """Valid sage_level_ arguments (B=1, Ncap=6, F=1 at the root, V=8), with some replaced."""
    args = dict(tokens=torch.zeros(1, 6, dtype=i64), parents=torch.full((1, 6), -1, dtype=i64),
                logprobs=torch.zeros(1, 6), cum_logprobs=torch.zeros(1, 6), tree_mask=torch.zeros(1, 7, 6),
                logits=torch.zeros(1, 1, 8), alpha=None, frontier_start=0, level=1, slot_start=1, num_slots=4, k=3,
                temperature=1.0, d_min=3.0, d_max=8.0, w_min=2.0, w_max=10.0, theta_scale=0.1)
    args.update(changes)
    return args


def commit_args(**changes):
    """Valid commit_tree_ arguments (B=1, a 4-node chain, all accepted), with some replaced."""
    args = dict(tokens=torch.tensor([[1, 2, 3, 4]]), parents=tree(4), accepted=torch.tensor([[0, 1, 2, 3]]),
                accept_len=torch.tensor([3]), bonus=torch.tensor([5]), sequence=torch.zeros(1, 10, dtype=i64),
                seq_start=2, target_caches=[torch.zeros(1, 1, 8, 4)], target_past=2,
                draft_caches=[torch.zeros(1, 1, 6, 4)], draft_rows=torch.tensor([[0, 1, 2, -1]]), draft_past=1,
                alpha=torch.tensor([0.5]))
    args.update(changes)
    return args


BAD_CALLS = {
    # topk_confidence
    "topk int logits": (lambda: ops.topk_confidence(torch.zeros(2, 5, dtype=i64), 2), "logits"),
    "topk float64 logits": (lambda: ops.topk_confidence(torch.zeros(2, 5, dtype=torch.float64), 2), "logits"),
    "topk 1-D logits": (lambda: ops.topk_confidence(torch.zeros(5), 2), "logits"),
    "topk 3-D logits": (lambda: ops.topk_confidence(torch.zeros(1, 2, 5), 2), "logits"),
    "topk k=0": (lambda: ops.topk_confidence(torch.zeros(2, 5), 0), "k"),
    "topk k>V": (lambda: ops.topk_confidence(torch.zeros(2, 5), 6), "k"),
    "topk k>64": (lambda: ops.topk_confidence(torch.zeros(2, 100), 65), "k"),
    "topk temperature 0": (lambda: ops.topk_confidence(torch.zeros(2, 5), 2, 0.0), "temperature"),
    "topk temperature <0": (lambda: ops.topk_confidence(torch.zeros(2, 5), 2, -1.0), "temperature"),
    "topk temperature nan": (lambda: ops.topk_confidence(torch.zeros(2, 5), 2, math.nan), "temperature"),
    # build_static_tree
    "static float paths": (lambda: ops.build_static_tree(torch.zeros(2, 2)), "paths"),
    "static 1-D paths": (lambda: ops.build_static_tree(torch.tensor([0, 1])), "paths"),
    "static duplicate": (lambda: ops.build_static_tree(ops.paths_to_tensor([[0], [0]])), "paths"),
    "static not closed": (lambda: ops.build_static_tree(ops.paths_to_tensor([[0], [1, 0]])), "paths"),
    "static rank 64": (lambda: ops.build_static_tree(ops.paths_to_tensor([[64]])), "paths"),
    "static negative rank": (lambda: ops.build_static_tree(torch.tensor([[-2]])), "paths"),
    "static empty row": (lambda: ops.build_static_tree(torch.tensor([[0, -1], [-1, -1]])), "paths"),
    "static gap in row": (lambda: ops.build_static_tree(torch.tensor([[0, -1, 1]])), "paths"),
    "static too many": (lambda: ops.build_static_tree(torch.arange(1024)[:, None] % 64), "paths"),
    # sage_tree
    "sage float64 alpha": (lambda: call_sage_tree(alpha=torch.tensor([0.5], dtype=torch.float64)), "alpha"),
    "sage 2-D alpha": (lambda: call_sage_tree(alpha=torch.zeros(1, 1)), "alpha"),
    "sage frontier batch": (lambda: call_sage_tree(frontier_logprobs=torch.zeros(2, 2)), "frontier_logprobs"),
    "sage frontier dtype": (lambda: call_sage_tree(frontier_logprobs=torch.zeros(1, 2, dtype=torch.float16)),
                            "frontier_logprobs"),
    "sage level 0": (lambda: call_sage_tree(level=0), "level"),
    "sage k 0": (lambda: call_sage_tree(k=0), "k"),
    "sage k 65": (lambda: call_sage_tree(k=65), "k"),
    "sage d_min 0": (lambda: call_sage_tree(d_min=0.0), "d_min"),
    "sage d_min > d_max": (lambda: call_sage_tree(d_min=9.0), "d_max"),
    "sage w_min > w_max": (lambda: call_sage_tree(w_min=11.0), "w_min"),
    "sage theta_scale < 0": (lambda: call_sage_tree(theta_scale=-0.1), "theta_scale"),
    # expand_tree
    "expand int32 tokens": (lambda: ops.expand_tree(**expand_args(tokens=torch.zeros(1, 6, dtype=torch.int32))),
                            "tokens"),
    "expand strided tokens": (lambda: ops.expand_tree(**expand_args(tokens=torch.zeros(1, 12, dtype=i64)[:, ::2])),
                              "tokens"),
    "expand parents shape": (lambda: ops.expand_tree(**expand_args(parents=torch.full((1, 5), -1))), "parents"),
    "expand logprobs dtype": (lambda: ops.expand_tree(**expand_args(logprobs=torch.zeros(1, 6, dtype=torch.float64))),
                              "logprobs"),
    "expand cum shape": (lambda: ops.expand_tree(**expand_args(cum_logprobs=torch.zeros(2, 6))), "cum_logprobs"),
    "expand frontier dtype": (lambda: ops.expand_tree(**expand_args(frontier=torch.tensor([[0.0, -1.0]]))),
                              "frontier"),
    "expand frontier after slot_start": (lambda: ops.expand_tree(**expand_args(frontier=torch.tensor([[0, 2]]))),
                                         "frontier"),
    "expand frontier < -1": (lambda: ops.expand_tree(**expand_args(frontier=torch.tensor([[0, -3]]))), "frontier"),
    "expand topk F": (lambda: ops.expand_tree(**expand_args(topk_logprobs=torch.zeros(1, 3, 3))), "topk_logprobs"),
    "expand topk K>64": (lambda: ops.expand_tree(**expand_args(topk_logprobs=torch.zeros(1, 2, 65),
                                                               topk_ids=torch.zeros(1, 2, 65, dtype=i64))),
                         "topk_logprobs"),
    "expand topk_ids dtype": (lambda: ops.expand_tree(**expand_args(topk_ids=torch.zeros(1, 2, 3))), "topk_ids"),
    "expand topk_ids shape": (lambda: ops.expand_tree(**expand_args(topk_ids=torch.zeros(1, 2, 2, dtype=i64))),
                              "topk_ids"),
    "expand widths shape": (lambda: ops.expand_tree(**expand_args(widths=torch.ones(1, 3, dtype=i64))), "widths"),
    "expand min_cum shape": (lambda: ops.expand_tree(**expand_args(min_cum_logprob=torch.zeros(2))),
                             "min_cum_logprob"),
    "expand slot_start 0": (lambda: ops.expand_tree(**expand_args(slot_start=0)), "slot_start"),
    "expand num_slots too many": (lambda: ops.expand_tree(**expand_args(num_slots=6)), "num_slots"),
    "expand num_slots < 0": (lambda: ops.expand_tree(**expand_args(num_slots=-1)), "num_slots"),
    "expand N > 1024": (lambda: ops.expand_tree(**expand_args(
        tokens=torch.zeros(1, 1025, dtype=i64), parents=torch.full((1, 1025), -1), logprobs=torch.zeros(1, 1025),
        cum_logprobs=torch.zeros(1, 1025))), "tokens"),
    # rerank_tree
    "rerank not topological": (lambda: ops.rerank_tree(torch.tensor([[-1, 2, 0]]), torch.zeros(1, 3), 2), "parents"),
    "rerank child of padding": (lambda: ops.rerank_tree(torch.tensor([[-1, -1, 1]]), torch.zeros(1, 3), 2),
                                "parents"),
    "rerank root": (lambda: ops.rerank_tree(torch.tensor([[0, 0, 0]]), torch.zeros(1, 3), 2), "parents"),
    "rerank parent < -1": (lambda: ops.rerank_tree(torch.tensor([[-1, -2, 0]]), torch.zeros(1, 3), 2), "parents"),
    "rerank cum dtype": (lambda: ops.rerank_tree(tree(3), torch.zeros(1, 3, dtype=torch.float64), 2), "cum_logprobs"),
    "rerank cum shape": (lambda: ops.rerank_tree(tree(3), torch.zeros(1, 4), 2), "cum_logprobs"),
    "rerank num_select 0": (lambda: ops.rerank_tree(tree(3), torch.zeros(1, 3), 0), "num_select"),
    "rerank num_select > N": (lambda: ops.rerank_tree(tree(3), torch.zeros(1, 3), 4), "num_select"),
    "rerank N > 1024": (lambda: ops.rerank_tree(tree(1025), torch.zeros(1, 1025), 2), "parents"),
    # tree_buffers
    "buffers int32 parents": (lambda: ops.tree_buffers(tree().int(), 0), "parents"),
    "buffers 1-D parents": (lambda: ops.tree_buffers(tree()[0], 0), "parents"),
    "buffers not topological": (lambda: ops.tree_buffers(torch.tensor([[-1, 0, 3, 1]]), 0), "parents"),
    "buffers past_len": (lambda: ops.tree_buffers(tree(), -1), "past_len"),
    "buffers mask_dtype": (lambda: ops.tree_buffers(tree(), 0, torch.int64), "mask_dtype"),
    "buffers N > 1024": (lambda: ops.tree_buffers(tree(1025), 0), "parents"),
    # verify_greedy
    "greedy int32 tokens": (lambda: ops.verify_greedy(tree().int(), tree(), tree()), "tokens"),
    "greedy parents shape": (lambda: ops.verify_greedy(tree(), tree(5), tree()), "parents"),
    "greedy not topological": (lambda: ops.verify_greedy(tree(), torch.tensor([[-1, 1, 0, 0]]), tree()), "parents"),
    "greedy int32 target": (lambda: ops.verify_greedy(tree(), tree(), tree().int()), "target"),
    "greedy target shape": (lambda: ops.verify_greedy(tree(), tree(), torch.zeros(1, 3, 8)), "target"),
    "greedy target rank": (lambda: ops.verify_greedy(tree(), tree(), torch.zeros(1, 4, 2, 2)), "target"),
    "greedy N > 1024": (lambda: ops.verify_greedy(tree(1025), tree(1025), tree(1025)), "tokens"),
    # verify_sampling
    "sampling target dtype": (lambda: ops.verify_sampling(**sampling_args(target_probs=torch.ones(1, 3, 5, dtype=i64))),
                              "target_probs"),
    "sampling target shape": (lambda: ops.verify_sampling(**sampling_args(target_probs=torch.ones(1, 2, 5))),
                              "target_probs"),
    "sampling draft shape": (lambda: ops.verify_sampling(**sampling_args(draft_probs=torch.ones(1, 3, 4))),
                             "draft_probs"),
    "sampling draft dtype": (lambda: ops.verify_sampling(**sampling_args(
        draft_probs=torch.ones(1, 3, 5, dtype=torch.float16))), "draft_probs"),
    "sampling token outside vocab": (lambda: ops.verify_sampling(**sampling_args(tokens=torch.tensor([[0, 1, 7]]))),
                                     "tokens"),
    "sampling not topological": (lambda: ops.verify_sampling(**sampling_args(parents=torch.tensor([[-1, 2, 0]]))),
                                 "parents"),
    "sampling uniforms dtype": (lambda: torch.ops.sage_ext.verify_sampling(
        tree(3), tree(3), torch.ones(1, 3, 5), None, torch.rand(1, 3, dtype=torch.float64)), "uniforms"),
    "sampling uniforms shape": (lambda: torch.ops.sage_ext.verify_sampling(
        tree(3), tree(3), torch.ones(1, 3, 5), None, torch.rand(1, 4)), "uniforms"),
    # verify_traversal (verify_sampling's checks, messages naming verify_traversal)
    "traversal target dtype": (lambda: ops.verify_traversal(**sampling_args(
        target_probs=torch.ones(1, 3, 5, dtype=i64))), "target_probs"),
    "traversal target shape": (lambda: ops.verify_traversal(**sampling_args(target_probs=torch.ones(1, 2, 5))),
                               "target_probs"),
    "traversal draft shape": (lambda: ops.verify_traversal(**sampling_args(draft_probs=torch.ones(1, 3, 4))),
                              "draft_probs"),
    "traversal draft dtype": (lambda: ops.verify_traversal(**sampling_args(
        draft_probs=torch.ones(1, 3, 5, dtype=torch.float16))), "draft_probs"),
    "traversal token outside vocab": (lambda: ops.verify_traversal(**sampling_args(tokens=torch.tensor([[0, 1, 7]]))),
                                      "tokens"),
    "traversal not topological": (lambda: ops.verify_traversal(**sampling_args(parents=torch.tensor([[-1, 2, 0]]))),
                                  "parents"),
    "traversal child of padding": (lambda: ops.verify_traversal(**sampling_args(
        parents=torch.tensor([[-1, -1, 1]]))), "parents"),
    "traversal uniforms dtype": (lambda: torch.ops.sage_ext.verify_traversal(
        tree(3), tree(3), torch.ones(1, 3, 5), None, torch.rand(1, 3, dtype=torch.float64)), "uniforms"),
    "traversal uniforms shape": (lambda: torch.ops.sage_ext.verify_traversal(
        tree(3), tree(3), torch.ones(1, 3, 5), None, torch.rand(1, 4)), "uniforms"),
    "traversal N > 1024": (lambda: torch.ops.sage_ext.verify_traversal(
        tree(1025), tree(1025), torch.ones(1, 1025, 2), None, torch.rand(1, 1025)), "tokens"),
    # kv_compact_
    "kv 3-D cache": (lambda: ops.kv_compact_([torch.zeros(1, 8, 4)], tree(3), 0), "caches"),
    "kv int cache": (lambda: ops.kv_compact_([torch.zeros(1, 1, 8, 4, dtype=i64)], tree(3), 0), "caches"),
    "kv cache batch": (lambda: ops.kv_compact_([torch.zeros(2, 1, 8, 4)], tree(3), 0), "caches"),
    "kv strided last dim": (lambda: ops.kv_compact_([torch.zeros(1, 1, 8, 8)[..., ::2]], tree(3), 0), "caches"),
    "kv accepted dtype": (lambda: ops.kv_compact_([torch.zeros(1, 1, 8, 4)], tree(3).int(), 0), "accepted"),
    "kv accepted rank": (lambda: ops.kv_compact_([torch.zeros(1, 1, 8, 4)], tree(3)[0], 0), "accepted"),
    "kv past_len": (lambda: ops.kv_compact_([torch.zeros(1, 1, 8, 4)], tree(3), -1), "past_len"),
    # sage_level_
    "level tokens dtype": (lambda: ops.sage_level_(**level_args(tokens=torch.zeros(1, 6, dtype=torch.int32))),
                           "tokens"),
    "level parents shape": (lambda: ops.sage_level_(**level_args(parents=torch.full((1, 5), -1))), "parents"),
    "level strided state": (lambda: ops.sage_level_(**level_args(cum_logprobs=torch.zeros(1, 12)[:, ::2])),
                            "cum_logprobs"),
    "level 2-D logits": (lambda: ops.sage_level_(**level_args(logits=torch.zeros(1, 8))), "logits"),
    "level int logits": (lambda: ops.sage_level_(**level_args(logits=torch.zeros(1, 1, 8, dtype=i64))), "logits"),
    "level logits batch": (lambda: ops.sage_level_(**level_args(logits=torch.zeros(2, 1, 8))), "logits"),
    "level alpha dtype": (lambda: ops.sage_level_(**level_args(alpha=torch.zeros(1, dtype=torch.float64))), "alpha"),
    "level alpha batch": (lambda: ops.sage_level_(**level_args(alpha=torch.zeros(2))), "alpha"),
    "level k > V": (lambda: ops.sage_level_(**level_args(k=9)), "k"),
    "level temperature": (lambda: ops.sage_level_(**level_args(temperature=0.0)), "temperature"),
    "level 0": (lambda: ops.sage_level_(**level_args(level=0)), "level"),
    "level d_max": (lambda: ops.sage_level_(**level_args(d_max=2.0)), "d_max"),
    "level theta": (lambda: ops.sage_level_(**level_args(theta_scale=-0.1)), "theta_scale"),
    "level frontier overlaps slots": (lambda: ops.sage_level_(**level_args(logits=torch.zeros(1, 2, 8))),
                                      "frontier_start"),
    "level slot_start 0": (lambda: ops.sage_level_(**level_args(slot_start=0)), "slot_start"),
    "level num_slots": (lambda: ops.sage_level_(**level_args(num_slots=6)), "num_slots"),
    "level mask rows": (lambda: ops.sage_level_(**level_args(tree_mask=torch.zeros(1, 4, 6))), "tree_mask"),
    "level mask dtype": (lambda: ops.sage_level_(**level_args(tree_mask=torch.zeros(1, 7, 6, dtype=i64))),
                         "tree_mask"),
    "level mask strided": (lambda: ops.sage_level_(**level_args(tree_mask=torch.zeros(1, 7, 12)[..., ::2])),
                           "tree_mask"),
    # commit_tree_
    "commit tokens 1-D": (lambda: ops.commit_tree_(**commit_args(tokens=torch.tensor([1, 2, 3, 4]))), "tokens"),
    "commit parents shape": (lambda: ops.commit_tree_(**commit_args(parents=tree(3))), "parents"),
    "commit accepted dtype": (lambda: ops.commit_tree_(**commit_args(accepted=torch.tensor([[0, 1, 2, 3]]).int())),
                              "accepted"),
    "commit accept_len shape": (lambda: ops.commit_tree_(**commit_args(accept_len=torch.tensor([[3]]))),
                                "accept_len"),
    "commit bonus batch": (lambda: ops.commit_tree_(**commit_args(bonus=torch.tensor([5, 5]))), "bonus"),
    "commit sequence dtype": (lambda: ops.commit_tree_(**commit_args(sequence=torch.zeros(1, 10))), "sequence"),
    "commit no room": (lambda: ops.commit_tree_(**commit_args(seq_start=7)), "seq_start"),
    "commit target cache rank": (lambda: ops.commit_tree_(**commit_args(target_caches=[torch.zeros(1, 8, 4)])),
                                 "target_caches"),
    "commit target_past": (lambda: ops.commit_tree_(**commit_args(target_past=-1)), "target_past"),
    "commit draft cache dtype": (lambda: ops.commit_tree_(**commit_args(
        draft_caches=[torch.zeros(1, 1, 6, 4, dtype=i64)])), "draft_caches"),
    "commit draft_past": (lambda: ops.commit_tree_(**commit_args(draft_past=9)), "draft_past"),
    "commit draft_rows narrow": (lambda: ops.commit_tree_(**commit_args(draft_rows=torch.tensor([[0, 1, 2]]))),
                                 "draft_rows"),
    "commit draft caches without rows": (lambda: ops.commit_tree_(**commit_args(draft_rows=None)), "draft_rows"),
    "commit alpha dtype": (lambda: ops.commit_tree_(**commit_args(alpha=torch.tensor([1], dtype=i64))), "alpha"),
    "commit accept_len too long": (lambda: ops.commit_tree_(**commit_args(accept_len=torch.tensor([4]))),
                                   "accept_len"),
    "commit accepted past the cache": (lambda: ops.commit_tree_(**commit_args(
        target_caches=[torch.zeros(1, 1, 4, 4)])), "accepted"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_names_the_argument(name):
    call, argument = BAD_CALLS[name]
    with pytest.raises((RuntimeError, ValueError)) as info:
        call()
    assert re.search(rf"\b{re.escape(argument)}\b", str(info.value)), f"message does not name {argument!r}: {info.value}"


@pytest.mark.parametrize("name", [name for name in BAD_CALLS if name.startswith("traversal")])
def test_traversal_errors_name_the_op(name):
    with pytest.raises((RuntimeError, ValueError), match="verify_traversal"):
        BAD_CALLS[name][0]()


def test_constants_match_the_extension():
    from sage_ext import _C

    assert ops.MAX_TREE_NODES == _C.MAX_TREE_NODES == 1024
    assert ops.MAX_TOPK == _C.MAX_TOPK == 64
    assert isinstance(ops.cuda_available(), bool)


def test_largest_sizes_are_accepted():
    n = ops.MAX_TREE_NODES
    parents = torch.tensor([[-1] + [0] * (n - 1)])
    depth, *_ = ops.tree_buffers(parents, 0)
    assert depth.shape == (1, n)
    alpha, lp, ids = ops.topk_confidence(torch.randn(2, 100), ops.MAX_TOPK)
    assert ids.shape == (2, ops.MAX_TOPK)


def test_messages_keep_their_numbers():
    """The numbers of a message survive formatting. A module that carries a static copy of libstdc++ (a compiler
    without a shared one, see CMakeLists.txt) formats them with an uninitialized locale: GCC 12 drops everything
    from the first number on, GCC 13 crashes the process."""
    with pytest.raises(ValueError) as info:
        ops.tree_buffers(torch.tensor([[-1, 0, 1, 5, 1, 0]]), 4)
    assert "batch row 0: parents[3] = 5 is not topological" in str(info.value)
    assert "earlier node in [0, 3)" in str(info.value)
