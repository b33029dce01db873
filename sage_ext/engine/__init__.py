"""The speculative decoding engine (one loop for every tree policy).

- ``loop``: ``SpeculativeGenerator`` (prefill, the step loop, verification and commit, stop checks) and the
  one-call ``generate`` / ``stream``;
- ``draft_round``: ``DraftRound``, the policies' handle on the native ``TreeWorkspace`` (the step's tree and all
  tensor work between two model forwards), and ``FixedLayout``;
- ``policies``: the tree shapes (``ar``, ``chain``, ``static``, ``dynamic``, ``sage``);
- ``caches``: the KV caches' key/value tensors grouped per device for the commit, cropped with HF's API;
- ``stats``: the step timeline and ``GenerationStats``.
"""
from .loop import GenerationOutput, SpeculativeGenerator, StepDebug, generate, stream

__all__ = ["GenerationOutput", "SpeculativeGenerator", "StepDebug", "generate", "stream"]
