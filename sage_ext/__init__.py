"""sage_ext: lossless tree speculative decoding (SAGE) for HuggingFace vision-language models.

`sage_ext.ops` holds the native tree-speculation ops (C++/CUDA, see docs/OPS.md),
`sage_ext.reference` their plain-PyTorch oracles, and the engine drives a draft and a target model.
"""
from . import ops, reference  # noqa: F401

__all__ = ["ops", "reference"]
