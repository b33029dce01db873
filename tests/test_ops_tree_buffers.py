"""tree_buffers: golden trees, the reference on random trees, and the float mask in a real HF model."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from ops_helpers import LOGIT_DTYPES, assert_same_outputs, random_parents, seeds

from sage_ext import ops, reference
from sage_ext.families.base import cache_kwarg

# node 4 is padding; 0 -> {1, 2}, 1 -> 3 -> 5
GOLDEN_PARENTS = [-1, 0, 0, 1, -1, 3]
GOLDEN_ANCESTORS = [{0}, {0, 1}, {0, 2}, {0, 1, 3}, {4}, {0, 1, 3, 5}]


def test_golden_tree():
    parents = torch.tensor([GOLDEN_PARENTS])
    depth, positions, first_child, next_sibling, paths, is_leaf, float_mask, packed = ops.tree_buffers(parents, 2)
    assert depth.tolist() == [[0, 1, 1, 2, 0, 3]]
    assert positions.tolist() == [[2, 3, 3, 4, 2, 5]]
    assert first_child.tolist() == [[1, 3, -1, 5, -1, -1]]
    assert next_sibling.tolist() == [[-1, 2, -1, -1, -1, -1]]
    assert paths[0].tolist() == [
        [0, -1, -1, -1, -1, -1],
        [0, 1, -1, -1, -1, -1],
        [0, 2, -1, -1, -1, -1],
        [0, 1, 3, -1, -1, -1],
        [-1, -1, -1, -1, -1, -1],
        [0, 1, 3, 5, -1, -1],
    ]
    assert is_leaf.tolist() == [[False, False, True, False, False, True]]
    assert packed.shape == (1, 6, 1) and packed.dtype == torch.uint8
    assert packed[0, :, 0].tolist() == [1, 3, 5, 11, 16, 43]
    blocked = torch.finfo(torch.float32).min
    assert float_mask.shape == (1, 1, 6, 8) and float_mask.dtype == torch.float32
    expected = [[0.0, 0.0] + [0.0 if j in GOLDEN_ANCESTORS[i] else blocked for j in range(6)] for i in range(6)]
    assert float_mask[0, 0].tolist() == expected


def test_packed_mask_spans_bytes_lsb_first():
    chain = torch.tensor([[-1] + list(range(9))])  # 10 nodes in a chain
    *_, float_mask, packed = ops.tree_buffers(chain, 0)
    assert packed.shape == (1, 10, 2)
    assert packed[0, 8].tolist() == [255, 1]
    assert packed[0, 9].tolist() == [255, 3]
    assert packed[0, 3].tolist() == [15, 0]


def test_specvlm_tree_buffers():
    parents, _, static_depth = ops.build_static_tree(ops.paths_to_tensor(ops.SPECVLM_TREE_PATHS))
    depth, positions, first_child, next_sibling, paths, is_leaf, float_mask, packed = ops.tree_buffers(
        parents[None], past_len=100, mask_dtype=torch.bfloat16
    )
    assert torch.equal(depth[0], static_depth)
    assert torch.equal(positions[0], 100 + static_depth)
    assert torch.nonzero(is_leaf[0]).flatten().tolist() == [9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 20, 22, 23, 24, 25]
    assert first_child[0, :5].tolist() == [1, 5, 8, 10, 12]
    assert next_sibling[0, 1:5].tolist() == [2, 3, 4, -1]
    assert paths[0, 25, :7].tolist() == [0, 1, 5, 13, 21, 25, -1]
    assert float_mask.dtype == torch.bfloat16 and float_mask.shape == (1, 1, 26, 126)
    assert torch.all(float_mask[0, 0, :, :100] == 0)
    # each row attends to exactly depth + 1 tree columns
    assert torch.equal((float_mask[0, 0, :, 100:] == 0).sum(-1), static_depth + 1)
    assert_same_outputs(
        (depth, positions, first_child, next_sibling, paths, is_leaf, float_mask, packed),
        reference.tree_buffers(parents[None], 100, torch.bfloat16),
    )


@given(batch=st.integers(1, 8), num_nodes=st.integers(1, 128), past_len=st.integers(0, 40),
       mask_dtype=st.sampled_from(LOGIT_DTYPES), seed=seeds)
def test_matches_reference(batch, num_nodes, past_len, mask_dtype, seed):
    parents = random_parents(batch, num_nodes, seed)
    got = ops.tree_buffers(parents, past_len, mask_dtype)
    assert_same_outputs(got, reference.tree_buffers(parents, past_len, mask_dtype))
    float_mask = got[6]
    blocked = torch.finfo(mask_dtype).min
    assert torch.all((float_mask == 0) | (float_mask == blocked))  # exactly the two HF values


def test_padding_rows_attend_past_and_self_only():
    parents = torch.tensor([[-1, -1, 0, -1]])
    depth, positions, first_child, next_sibling, paths, is_leaf, float_mask, packed = ops.tree_buffers(parents, 3)
    assert depth.tolist() == [[0, 0, 1, 0]] and positions.tolist() == [[3, 3, 4, 3]]
    assert is_leaf.tolist() == [[False, False, True, False]]
    assert first_child.tolist() == [[2, -1, -1, -1]] and next_sibling.tolist() == [[-1, -1, -1, -1]]
    assert paths[0, 1].tolist() == [-1] * 4 and paths[0, 3].tolist() == [-1] * 4
    row = (float_mask[0, 0] == 0).tolist()
    assert row[1] == [True] * 3 + [False, True, False, False]
    assert row[3] == [True] * 3 + [False, False, False, True]
    assert packed[0, :, 0].tolist() == [1, 2, 5, 8]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_float_mask_drives_a_huggingface_model(attn_implementation):
    """One tree forward with (float_mask, positions) gives each node the logits of its own path."""
    import transformers  # a dependency of sage_ext

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = attn_implementation
    model = transformers.LlamaForCausalLM(config).eval()

    prompt = torch.randint(0, 64, (1, 7))
    parents = torch.tensor([[-1, 0, 0, 1, -1, 1, 3, 2]])  # with a padding slot
    tokens = torch.randint(0, 64, parents.shape)
    _, positions, *_, paths, _, float_mask, _ = ops.tree_buffers(parents, prompt.shape[1], torch.float32)
    cache, cache_arg = transformers.DynamicCache(), cache_kwarg(model)
    with torch.no_grad():
        model(prompt, **{cache_arg: cache}, use_cache=True)
        tree = model(tokens, position_ids=positions, attention_mask=float_mask, **{cache_arg: cache}, use_cache=True)
        for node in range(parents.shape[1]):
            path = [i for i in paths[0, node].tolist() if i >= 0]
            if not path:  # padding
                continue
            sequential = model(torch.cat([prompt, tokens[:, path]], dim=1)).logits[0, -1]
            torch.testing.assert_close(tree.logits[0, node], sequential, atol=1e-4, rtol=1e-4)
