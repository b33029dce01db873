"""kv_compact_: in-place KV-cache row compaction against the reference, golden rows, strided caches."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from ops_helpers import matching_argmax, random_parents, random_tokens_for, seeds

from sage_ext import ops, reference


def test_golden_rows_move_in_order():
    keys = torch.arange(8.0).reshape(1, 1, 8, 1)
    values = 10 * torch.arange(8.0).reshape(1, 1, 8, 1)
    ops.kv_compact_([keys, values], torch.tensor([[0, 2, 3, -1]]), past_len=2)
    # rows 2.. hold the tree: node 0 stays, nodes 2 and 3 move to rows 3 and 4, the rest untouched
    assert keys.flatten().tolist() == [0, 1, 2, 4, 5, 5, 6, 7]
    assert values.flatten().tolist() == [0, 10, 20, 40, 50, 50, 60, 70]


def test_each_batch_row_uses_its_own_path():
    cache = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 1, 6, 1)
    ops.kv_compact_([cache], torch.tensor([[0, 1, 4], [0, 3, -1]]), past_len=1)
    assert cache[0].flatten().tolist() == [0, 1, 2, 5, 4, 5]
    assert cache[1].flatten().tolist() == [6, 7, 10, 9, 10, 11]


@given(
    batch=st.integers(1, 8),
    num_nodes=st.integers(1, 64),
    past_len=st.integers(0, 20),
    extra=st.integers(0, 5),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([1, 8, 64, 80]),
    num_layers=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    seed=seeds,
)
def test_matches_reference(batch, num_nodes, past_len, extra, heads, head_dim, num_layers, dtype, seed):
    parents = random_parents(batch, num_nodes, seed)
    tokens = random_tokens_for(parents, 50, seed)
    accepted, _, _ = ops.verify_greedy(tokens, parents, matching_argmax(tokens, parents, 50, seed, hit_prob=0.9))
    length = past_len + num_nodes + extra
    gen = torch.Generator().manual_seed(seed)
    caches = [torch.randn(batch, heads, length, head_dim, generator=gen).to(dtype) for _ in range(2 * num_layers)]
    expected = [c.clone() for c in caches]
    ops.kv_compact_(caches, accepted, past_len)
    reference.kv_compact_(expected, accepted, past_len)
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)


def test_strided_caches_are_compacted_in_place():
    # A [B, L, H, D] buffer viewed as [B, H, L, D] (last dim contiguous, others strided), and a
    # preallocated cache of which only the first L rows are in use.
    gen = torch.Generator().manual_seed(0)
    buffer = torch.randn(2, 12, 3, 16, generator=gen)
    transposed = buffer.transpose(1, 2)
    big = torch.randn(2, 3, 20, 16, generator=gen)
    window = big[:, :, :12]
    accepted = torch.tensor([[0, 2, 5, 7, -1], [0, 1, 2, 3, 4]])
    expected = [transposed.clone(), window.clone()]
    reference.kv_compact_(expected, accepted, past_len=4)
    untouched_tail = big[:, :, 12:].clone()
    ops.kv_compact_([transposed, window], accepted, past_len=4)
    assert torch.equal(transposed, expected[0]) and torch.equal(buffer.transpose(1, 2), expected[0])
    assert torch.equal(window, expected[1]) and torch.equal(big[:, :, 12:], untouched_tail)


def test_empty_cache_list_is_fine():
    ops.kv_compact_([], torch.tensor([[0, 1]]), past_len=0)


@pytest.mark.parametrize(
    "accepted, message",
    [
        (torch.tensor([[0, 0, -1]]), "accepted"),  # accepted[1] = 0 < 1: would overwrite a source row
        (torch.tensor([[0, 1, 9]]), "accepted"),  # past_len + 9 >= L
    ],
)
def test_bad_accepted_rows_raise(accepted, message):
    cache = torch.zeros(1, 1, 8, 4)
    with pytest.raises((RuntimeError, ValueError), match=message):
        ops.kv_compact_([cache], accepted, past_len=2)
