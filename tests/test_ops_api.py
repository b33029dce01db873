"""The public op API: wrappers and reference oracles share signatures, every wrapper is documented
(numpy style), and the docstring examples run and print what they claim."""
import doctest
import inspect

import pytest
import torch

from sage_ext import ops, reference

OP_FUNCTIONS = ["topk_confidence", "build_static_tree", "sage_tree", "expand_tree", "rerank_tree", "tree_buffers",
                "verify_greedy", "verify_sampling", "verify_traversal", "kv_compact_", "sage_level_", "commit_tree_"]


@pytest.mark.parametrize("name", OP_FUNCTIONS)
def test_reference_has_the_wrapper_signature(name):
    wrapper = inspect.signature(getattr(ops, name))
    oracle = inspect.signature(getattr(reference, name))
    assert [(p.name, p.default) for p in wrapper.parameters.values()] == [
        (p.name, p.default) for p in oracle.parameters.values()
    ]


@pytest.mark.parametrize("name", OP_FUNCTIONS)
def test_every_op_is_registered_and_documented(name):
    assert hasattr(torch.ops.sage_ext, name)
    doc = inspect.getdoc(getattr(ops, name))
    for section in ("Parameters", "Returns", "Examples"):
        assert f"{section}\n---" in doc, f"{name} docstring lacks a {section} section"


def test_docstring_examples_run():
    results = doctest.testmod(ops, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert results.attempted >= len(OP_FUNCTIONS)
    assert results.failed == 0


def test_specvlm_paths_and_packing():
    assert len(ops.SPECVLM_TREE_PATHS) == 25
    assert max(len(p) for p in ops.SPECVLM_TREE_PATHS) == 5
    packed = ops.paths_to_tensor([[0], [1, 2, 3]])
    assert packed.dtype == torch.int64 and packed.tolist() == [[0, -1, -1], [1, 2, 3]]
