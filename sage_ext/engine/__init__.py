"""The speculative decoding engine (one loop for every tree policy).

- ``loop``: ``SpeculativeGenerator`` (per-row prefill, the step loop over a batch of rows, verification and commit,
  stop checks) and the one-call ``generate`` / ``stream``;
- ``draft_round``: ``DraftRound``, the policies' handle on the native ``TreeWorkspace`` (the step's tree and all
  tensor work between two model forwards), and ``FixedLayout``;
- ``policies``: the tree shapes (``ar``, ``chain``, ``static``, ``dynamic``, ``sage``);
- ``caches``: ``RowCache`` (the KV caches, every batch row at its own length; static buffers for a captured draft)
  and its layers grouped per device for the commit;
- ``capture``: the draft's tree forward compiled for a few fixed shapes (``capture_draft=True``);
- ``processing``: the target's scores per tree node as ``generate``'s logits processors leave them (repetition
  penalty, minimum lengths);
- ``coupled``: the Gumbel-coupled sampling rule (``sampling_rule="gumbel"``: each position's token fixed by its own
  noise, so a seeded call's tokens do not depend on the trees);
- ``costs``: the live cost and acceptance estimates of ``sage_cost``;
- ``stats``: the step timeline and ``GenerationStats``.
"""
from .loop import GenerationOutput, SpeculativeGenerator, StepDebug, generate, stream

__all__ = ["GenerationOutput", "SpeculativeGenerator", "StepDebug", "generate", "stream"]
