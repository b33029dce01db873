"""sage_ext: lossless tree speculative decoding (SAGE) for HuggingFace vision-language models.

- `sage_ext.ops`: the native tree-speculation ops (C++ on CPU, CUDA on GPU; contract in docs/OPS.md);
- `sage_ext.reference`: plain-PyTorch oracles of the same ops;
- `SpeculativeGenerator` / `generate`: the engine driving an HF draft and target model with a tree
  policy (`"ar"`, `"chain"`, `"static"`, `"dynamic"`, `"sage"` or a policy object);
- `sage_ext.families`: per-family adapters; `sage_ext.pruning`: draft-side visual token pruning;
- `sage_ext.cli`: the `sage-ext` command (demo, generate, bench); `sage_ext.fixtures`: the bundled
  draft/target pair and its procedural scene task.
"""
from . import ops, reference  # noqa: F401
from .engine import GenerationOutput, SpeculativeGenerator, StepDebug, generate
from .policies import (
    SPECVLM_TREE_PATHS,
    AutoregressivePolicy,
    ChainPolicy,
    DynamicTreePolicy,
    SagePolicy,
    StaticTreePolicy,
    TreePolicy,
)
from .stats import GenerationStats, StepRecord

__all__ = [
    "ops",
    "reference",
    "SpeculativeGenerator",
    "generate",
    "GenerationOutput",
    "StepDebug",
    "GenerationStats",
    "StepRecord",
    "TreePolicy",
    "AutoregressivePolicy",
    "ChainPolicy",
    "StaticTreePolicy",
    "DynamicTreePolicy",
    "SagePolicy",
    "SPECVLM_TREE_PATHS",
]
