"""The native tree-speculation ops of `sage_ext`, as documented Python functions.

Importing this module loads the compiled extension `sage_ext._C`, which registers the ops as
`torch.ops.sage_ext.<name>` with CPU kernels (and CUDA kernels when built with a CUDA toolkit).
Each function below is a thin wrapper over one registered op; docs/OPS.md is the exact contract
and `sage_ext.reference` holds a plain-PyTorch oracle of every op with the same signature.

The module also registers a fake (meta) implementation of every op, so the ops run on meta
tensors and trace under `torch.compile(fullgraph=True)`: every output shape depends only on
input shapes and scalar arguments, never on tensor data.

Conventions: B batch, N tree nodes (node 0 = root = last committed token, parent -1; a node
i > 0 with parent -1 is padding), V vocabulary, K top-k. Parents are topological.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _C  # loading it registers torch.ops.sage_ext.*; also the limits below

__all__ = [
    "MAX_TREE_NODES",
    "MAX_TOPK",
    "SPECVLM_TREE_PATHS",
    "cuda_available",
    "paths_to_tensor",
    "topk_confidence",
    "build_static_tree",
    "sage_tree",
    "expand_tree",
    "rerank_tree",
    "tree_buffers",
    "verify_greedy",
    "verify_sampling",
    "verify_traversal",
    "kv_compact_",
    "sage_level_",
    "expand_level_",
    "gather_level_",
    "rerank_select",
    "tree_mask_feed_",
    "commit_tree_",
]

#: Largest tree (number of nodes N, root included) any op accepts (csrc/core/formulas.h, read from the extension).
MAX_TREE_NODES: int = _C.MAX_TREE_NODES
#: Largest top-k any op accepts (csrc/core/formulas.h, read from the extension).
MAX_TOPK: int = _C.MAX_TOPK

#: The 25-draft-node, depth-5 static tree of SpecVLM (SAGE's first round and the "SD-Tree"
#: baseline), as paths of child ranks from the root. Level sizes 4, 8, 8, 3, 2.
SPECVLM_TREE_PATHS: list[list[int]] = [
    [0], [1], [2], [3],
    [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [2, 1], [3, 0],
    [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 2, 0], [0, 2, 1], [1, 0, 0],
    [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2],
    [0, 0, 0, 0, 0], [0, 0, 0, 0, 1],
]  # fmt: skip


def cuda_available() -> bool:
    """Whether this build of the extension contains the CUDA kernels.

    Returns
    -------
    bool
        True when `sage_ext._C` was compiled with a CUDA toolkit (the ops then accept CUDA
        tensors); False for a CPU-only build. It says nothing about whether a GPU is present:
        combine with `torch.cuda.is_available()` for that.
    """
    return bool(_C.cuda_built())


def paths_to_tensor(paths: Sequence[Sequence[int]], device: torch.device | str | None = None) -> torch.Tensor:
    """Pack rank paths (lists of child ranks) into the `[P, L]` int64 tensor `build_static_tree` takes.

    Parameters
    ----------
    paths : sequence of sequences of int
        Each entry is a non-empty path of child ranks from the root, e.g. `[0, 2]` = the third
        child of the first child of the root.
    device : torch.device or str, optional
        Where to put the tensor (default: CPU).

    Returns
    -------
    torch.Tensor
        `[P, L]` int64 with `L` the longest path length; shorter rows padded with -1 at the end.

    Examples
    --------
    >>> paths_to_tensor([[0], [1], [0, 0]])
    tensor([[ 0, -1],
            [ 1, -1],
            [ 0,  0]])
    """
    longest = max((len(path) for path in paths), default=1)
    rows = [list(path) + [-1] * (longest - len(path)) for path in paths]
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(rows), longest)


# --------------------------------------------------------------------------------------------
# wrappers
# --------------------------------------------------------------------------------------------
def topk_confidence(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """SAGE confidence alpha (paper Eq. 7-9) with the top-k log-probabilities and ids of each row.

    Parameters
    ----------
    logits : torch.Tensor
        `[R, V]` float32, float16 or bfloat16 logits (any device). NaN counts as -inf, +inf as the
        largest finite float32.
    k : int
        Top-k size, `1 <= k <= min(V, MAX_TOPK)`.
    temperature : float, default 1.0
        Logits are divided by it (> 0) before the softmax.

    Returns
    -------
    alpha : torch.Tensor
        `[R]` float32 in [0, 1]: `1 - H / log(k)` with H the entropy of the renormalized top-k
        (1 when `k == 1`; 0 for a row without any finite logit).
    topk_logprobs : torch.Tensor
        `[R, k]` float32: full-vocabulary log-softmax of the k largest logits, descending.
    topk_ids : torch.Tensor
        `[R, k]` int64 token ids, ties broken toward the lower id.

    Examples
    --------
    >>> alpha, lp, ids = topk_confidence(torch.tensor([[4.0, 0.0, 0.0, 0.0]]), k=2)
    >>> ids
    tensor([[0, 1]])
    """
    return torch.ops.sage_ext.topk_confidence(logits, k, temperature)


def build_static_tree(paths: torch.Tensor):
    """Static draft tree from paths of child ranks (e.g. `SPECVLM_TREE_PATHS`).

    Parameters
    ----------
    paths : torch.Tensor
        `[P, L]` int64, one path per row, -1 padded at the end (see `paths_to_tensor`). Paths
        must be non-empty, unique, ancestor-closed, with ranks in `[0, MAX_TOPK)`.

    Returns
    -------
    parents : torch.Tensor
        `[P + 1]` int64: root first (parent -1), then the nodes by depth, then lexicographically
        by rank path; `parents[i] < i`.
    ranks : torch.Tensor
        `[P + 1]` int64: each node's rank among its siblings in the draft's top-k (root -1).
    depth : torch.Tensor
        `[P + 1]` int64 (root 0).

    Examples
    --------
    >>> parents, ranks, depth = build_static_tree(paths_to_tensor([[1], [0], [0, 0]]))
    >>> parents, ranks, depth
    (tensor([-1,  0,  0,  1]), tensor([-1,  0,  1,  0]), tensor([0, 1, 1, 2]))
    """
    return torch.ops.sage_ext.build_static_tree(paths)


def sage_tree(alpha: torch.Tensor, frontier_logprobs: torch.Tensor, level: int, k: int, d_min: float,
              d_max: float, w_min: float, w_max: float, theta_scale: float = 0.1):
    """SAGE tree shape (paper Eq. 10-12) for one level of expansion.

    Parameters
    ----------
    alpha : torch.Tensor
        `[B]` float32 confidence (from `topk_confidence`).
    frontier_logprobs : torch.Tensor
        `[B, F]` float32: conditional draft log-prob of each frontier node (root: 0);
        -inf marks an empty slot.
    level : int
        Depth of the children being created (>= 1).
    k : int
        Largest width (the top-k the draft provides), `1 <= k <= MAX_TOPK`.
    d_min, d_max, w_min, w_max : float
        Depth and width ranges: `D = d_min + alpha (d_max - d_min)`,
        `W = w_min + (1 - alpha)(w_max - w_min)`.
    theta_scale : float, default 0.1
        Threshold scale: a candidate needs cumulative probability > `theta_scale * level / D`; `>= 0`, and 0
        means no threshold.

    Returns
    -------
    widths : torch.Tensor
        `[B, F]` int64 children per frontier node: `clamp(round(W), 1, k)` at level 1,
        `clamp(round(W (0.5 + exp(frontier_logprob)) / level), 1, k)` deeper; 0 for empty slots
        and when `level > max_depth`.
    min_cum_logprob : torch.Tensor
        `[B]` float32, `log(theta_scale * level / D)`.
    max_depth : torch.Tensor
        `[B]` int64, `round(D)`.

    Examples
    --------
    >>> widths, min_cum, max_depth = sage_tree(torch.tensor([0.5]), torch.zeros(1, 1), 1, 10, 3, 8, 2, 10)
    >>> widths, max_depth
    (tensor([[6]]), tensor([6]))
    """
    return torch.ops.sage_ext.sage_tree(alpha, frontier_logprobs, level, k, d_min, d_max, w_min, w_max,
                                        theta_scale)


def expand_tree(tokens: torch.Tensor, parents: torch.Tensor, logprobs: torch.Tensor, cum_logprobs: torch.Tensor,
                frontier: torch.Tensor, topk_logprobs: torch.Tensor, topk_ids: torch.Tensor, widths: torch.Tensor,
                min_cum_logprob: torch.Tensor, slot_start: int, num_slots: int) -> torch.Tensor:
    """One best-first level of tree expansion, written in place into slots `[slot_start, slot_start + num_slots)`.

    Parameters
    ----------
    tokens, parents : torch.Tensor
        `[B, Ncap]` int64 tree state, modified in place (contiguous).
    logprobs, cum_logprobs : torch.Tensor
        `[B, Ncap]` float32 conditional and cumulative draft log-prob per node (root 0 and 0),
        modified in place (contiguous).
    frontier : torch.Tensor
        `[B, F]` int64 node index of each frontier slot, -1 = empty.
    topk_logprobs, topk_ids : torch.Tensor
        `[B, F, K]` float32 / int64: each frontier node's top-K children, sorted descending.
    widths : torch.Tensor
        `[B, F]` int64: leading ranks of each frontier node allowed as children (from `sage_tree`).
    min_cum_logprob : torch.Tensor
        `[B]` float32: a candidate is kept iff its cumulative log-prob is larger.
    slot_start : int
        First slot written, `>= 1`.
    num_slots : int
        Node budget of this level, `slot_start + num_slots <= Ncap`.

    Returns
    -------
    torch.Tensor
        `count [B]` int64: real nodes written. The best candidates (cumulative log-prob
        descending, ties to smaller `(f, r)`) fill the slots in order; the rest become padding
        (token 0, parent -1, logprob -inf). The next level's frontier is the slot range.

    Examples
    --------
    >>> tokens = torch.zeros(1, 4, dtype=torch.long); parents = torch.full((1, 4), -1)
    >>> logprobs = torch.zeros(1, 4); cum = torch.zeros(1, 4)
    >>> count = expand_tree(tokens, parents, logprobs, cum, torch.tensor([[0]]),
    ...                     torch.log(torch.tensor([[[0.6, 0.3, 0.1]]])), torch.tensor([[[7, 8, 9]]]),
    ...                     torch.tensor([[2]]), torch.tensor([-5.0]), 1, 3)
    >>> count, tokens, parents
    (tensor([2]), tensor([[0, 7, 8, 0]]), tensor([[-1,  0,  0, -1]]))
    """
    return torch.ops.sage_ext.expand_tree(tokens, parents, logprobs, cum_logprobs, frontier, topk_logprobs,
                                          topk_ids, widths, min_cum_logprob, slot_start, num_slots)


def rerank_tree(parents: torch.Tensor, cum_logprobs: torch.Tensor, num_select: int):
    """EAGLE-2 global top-N selection of tree nodes, always ancestor-closed.

    Parameters
    ----------
    parents : torch.Tensor
        `[B, N]` int64 tree.
    cum_logprobs : torch.Tensor
        `[B, N]` float32 cumulative draft log-prob of each node.
    num_select : int
        Nodes to keep, root included, `1 <= num_select <= N`.

    Returns
    -------
    keep : torch.Tensor
        `[B, num_select]` int64 selected node indices, ascending, -1 padded when the tree has
        fewer real nodes. Score: `s[root] = +inf`, `s[i] = min(cum_logprobs[i], s[parent[i]])`;
        best scores win, ties to the lower index; padding is never selected.
    new_parents : torch.Tensor
        `[B, num_select]` int64: each kept node's parent as a position in `keep` (root and
        padding -1) — a valid tree to gather `tokens[keep]` into.

    Examples
    --------
    >>> parents = torch.tensor([[-1, 0, 0, 1]])
    >>> cum = torch.log(torch.tensor([[1.0, 0.5, 0.4, 0.45]]))
    >>> rerank_tree(parents, cum, 3)
    (tensor([[0, 1, 3]]), tensor([[-1,  0,  1]]))
    """
    return torch.ops.sage_ext.rerank_tree(parents, cum_logprobs, num_select)


def tree_buffers(parents: torch.Tensor, past_len: int, mask_dtype: torch.dtype = torch.float32):
    """Derive everything a tree forward and its verification need from `parents`.

    Parameters
    ----------
    parents : torch.Tensor
        `[B, N]` int64 tree, `N <= MAX_TREE_NODES`.
    past_len : int
        Tokens already in the KV cache before the tree (>= 0).
    mask_dtype : torch.dtype, default torch.float32
        float32, float16 or bfloat16: dtype of `float_mask` (use the model's dtype).

    Returns
    -------
    depth : torch.Tensor
        `[B, N]` int64 (root and padding 0).
    positions : torch.Tensor
        `[B, N]` int64, `past_len + depth` (position ids of the tree tokens).
    first_child, next_sibling : torch.Tensor
        `[B, N]` int64 child links (smallest-index child / next larger-index sibling, -1 if none).
    paths : torch.Tensor
        `[B, N, N]` int64: row i = node indices from the root to i, -1 padded.
    is_leaf : torch.Tensor
        `[B, N]` bool: real node without children.
    float_mask : torch.Tensor
        `[B, 1, N, past_len + N]` additive attention mask for HuggingFace models: 0 where node i
        may attend (all past columns and its ancestors-or-self), `finfo(mask_dtype).min` elsewhere.
    packed_mask : torch.Tensor
        `[B, N, ceil(N / 8)]` uint8: bit `j % 8` of byte `j // 8` in row i set iff j is an
        ancestor-or-self of i.

    Examples
    --------
    >>> depth, positions, *_, float_mask, packed = tree_buffers(torch.tensor([[-1, 0, 0]]), past_len=5)
    >>> positions, packed[0, :, 0]
    (tensor([[5, 6, 6]]), tensor([1, 3, 5], dtype=torch.uint8))
    """
    return torch.ops.sage_ext.tree_buffers(parents, past_len, mask_dtype)


def verify_greedy(tokens: torch.Tensor, parents: torch.Tensor, target: torch.Tensor):
    """Greedy tree verification: follow the child whose token is the target's argmax.

    Parameters
    ----------
    tokens, parents : torch.Tensor
        `[B, N]` int64 draft tree (root token = last committed token).
    target : torch.Tensor
        The target's argmax after each node, `[B, N]` int64, or its logits `[B, N, V]`
        float32/float16/bfloat16 (argmax taken inside, ties to the lowest id).

    Returns
    -------
    accepted : torch.Tensor
        `[B, N]` int64 accepted path `[0, i1, ..., ia]` of node indices, -1 padded.
    accept_len : torch.Tensor
        `[B]` int64, `a` = accepted draft tokens (tau).
    bonus : torch.Tensor
        `[B]` int64, the target's argmax after the last accepted node.

    Examples
    --------
    >>> tokens = torch.tensor([[5, 7, 8, 9]]); parents = torch.tensor([[-1, 0, 0, 2]])
    >>> verify_greedy(tokens, parents, torch.tensor([[8, 1, 9, 4]]))
    (tensor([[ 0,  2,  3, -1]]), tensor([2]), tensor([4]))
    """
    return torch.ops.sage_ext.verify_greedy(tokens, parents, target)


def verify_sampling(tokens: torch.Tensor, parents: torch.Tensor, target_probs: torch.Tensor,
                    draft_probs: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """Lossless tree rejection sampling: the emitted tokens follow the target distribution exactly.

    Parameters
    ----------
    tokens, parents : torch.Tensor
        `[B, N]` int64 draft tree.
    target_probs : torch.Tensor
        `[B, N, V]` float: row u = the target's distribution of the token after node u (need not
        be exactly normalized).
    draft_probs : torch.Tensor, optional
        `[B, N, V]` (dtype of `target_probs`): row u = the draft distribution q the children of u
        were *sampled* from (SpecInfer rule: accept x with `min(1, p(x)/q(x))`, else
        `p <- relu(p - q)`). None for a deterministic (top-k) draft: accept x with `p(x)`, else
        zero `p(x)`.
    generator : torch.Generator, optional
        Source of the `[B, N]` uniforms; seeded runs repeat exactly. A generator on another device than
        `tokens` (a CPU generator with CUDA tensors) works too: the uniforms are drawn from it on its own
        device (B * N values, as the same call on CPU tensors draws), staged in pinned memory and copied to
        `tokens.device` without a host-device sync. So a CPU generator seeded alike gives the same uniforms,
        hence the same result up to float rounding, on CPU and CUDA tensors.

    Returns
    -------
    accepted, accept_len, bonus : torch.Tensor
        As in `verify_greedy`; `bonus` is sampled from the residual distribution at the last
        accepted node (from its target row when the residual vanished numerically; -1 when that row
        has no positive entry: NaN or inf probabilities, not a distribution).

    Examples
    --------
    >>> tokens = torch.tensor([[0, 1, 2]]); parents = torch.tensor([[-1, 0, 0]])
    >>> probs = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    >>> verify_sampling(tokens, parents, probs, generator=torch.Generator().manual_seed(0))
    (tensor([[ 0,  1, -1]]), tensor([1]), tensor([2]))
    """
    batch, num_nodes = tokens.shape
    uniforms = _uniforms(batch, num_nodes, generator, tokens.device)
    return torch.ops.sage_ext.verify_sampling(tokens, parents, target_probs, draft_probs, uniforms)


def verify_traversal(tokens: torch.Tensor, parents: torch.Tensor, target_probs: torch.Tensor,
                     draft_probs: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """Traversal Verification (leaf to root, sequence-level acceptance): lossless, and a drop-in for
    `verify_sampling` that accepts at least as many draft tokens in expectation on chains (typically
    more on trees).

    The tree is visited in post-order (children in increasing index): a node is decided once all its
    children were rejected, with an acceptance probability for the whole path from the root,
    `alpha_c = min(1, alpha_parent * p(x_c) / q(x_c))` (clipped product of target/draft ratios);
    a rejected subtree leaves its parent the residual `relu(alpha p - q)` and a new
    `alpha = R / (1 - alpha + R)` (R the residual's mass). On a chain this is Block Verification; on
    trees whose children all hang under the root it makes `verify_sampling`'s decisions.

    Parameters
    ----------
    tokens, parents : torch.Tensor
        `[B, N]` int64 draft tree.
    target_probs : torch.Tensor
        `[B, N, V]` float: row u = the target's distribution of the token after node u (need not
        be exactly normalized).
    draft_probs : torch.Tensor, optional
        `[B, N, V]` (dtype of `target_probs`): row u = the draft distribution q the children of u
        were *sampled* from (independently of each other). None for a deterministic (top-k) draft:
        child c's draft distribution is the point mass on its token, so `alpha_c = alpha_u p(x_c)` and
        a rejection zeroes `p(x_c)`.
    generator : torch.Generator, optional
        Source of the `[B, N]` uniforms, exactly as in `verify_sampling` (same count, same draw):
        `uniforms[b, c]` decides node c when the traversal reaches it, `uniforms[b, 0]` draws the bonus.

    Returns
    -------
    accepted, accept_len, bonus : torch.Tensor
        As in `verify_sampling`; `bonus` is sampled from the residual distribution at the accepted node
        (the same fallbacks, -1 included).

    Examples
    --------
    >>> tokens = torch.tensor([[0, 1, 2]]); parents = torch.tensor([[-1, 0, 1]])
    >>> probs = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    >>> verify_traversal(tokens, parents, probs, generator=torch.Generator().manual_seed(0))
    (tensor([[0, 1, 2]]), tensor([2]), tensor([0]))
    """
    batch, num_nodes = tokens.shape
    uniforms = _uniforms(batch, num_nodes, generator, tokens.device)
    return torch.ops.sage_ext.verify_traversal(tokens, parents, target_probs, draft_probs, uniforms)


def _uniforms(batch: int, num_nodes: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """`[batch, num_nodes]` uniforms on `device` from `generator` (None: the default generator of `device`).

    A generator of another device type draws on its own device; from the CPU to CUDA the values go through
    pinned memory with a non-blocking copy (the caching host allocator keeps the buffer until the copy ran),
    so no host-device sync happens; the other way (a CUDA generator, CPU tensors) the copy waits for the GPU."""
    if generator is None or generator.device.type == device.type:
        return torch.rand(batch, num_nodes, generator=generator, device=device)
    uniforms = torch.rand(batch, num_nodes, generator=generator, device=generator.device)
    if uniforms.device.type == "cpu" and device.type == "cuda":
        uniforms = uniforms.pin_memory()
    return uniforms.to(device, non_blocking=True)


def kv_compact_(caches: Sequence[torch.Tensor], accepted: torch.Tensor, past_len: int) -> None:
    """Move the accepted tree rows of every KV-cache tensor to contiguous positions, in place.

    Parameters
    ----------
    caches : list of torch.Tensor
        `[B, H, L, D]` tensors (any float dtype, last dim contiguous, same B and device), e.g. the
        keys and values of every layer of a HuggingFace `DynamicCache`. One kernel launch on CUDA.
    accepted : torch.Tensor
        `[B, A]` int64 accepted node indices (a `verify_*` output), -1 padded.
    past_len : int
        Cache length before the tree (the tree's node i sits at row `past_len + i`).

    Returns
    -------
    None
        For each b and j with `accepted[b, j] >= 0`: row `past_len + j` <- row
        `past_len + accepted[b, j]`. Crop the cache to `past_len + accept_len + 1` afterwards.

    Examples
    --------
    >>> keys = torch.arange(6.0).reshape(1, 1, 6, 1)
    >>> kv_compact_([keys], torch.tensor([[0, 2, 3]]), past_len=2)
    >>> keys.flatten()
    tensor([0., 1., 2., 4., 5., 5.])
    """
    torch.ops.sage_ext.kv_compact_(list(caches), accepted, past_len)


# --------------------------------------------------------------------------------------------
# engine-step ops: several of the ops above fused into one call (what a decoding loop runs between
# model forwards, where every separate small call is costly)
# --------------------------------------------------------------------------------------------
def sage_level_(tokens: torch.Tensor, parents: torch.Tensor, logprobs: torch.Tensor, cum_logprobs: torch.Tensor,
                tree_mask: torch.Tensor | None, logits: torch.Tensor, alpha: torch.Tensor | None, frontier_start: int,
                level: int, slot_start: int, num_slots: int, k: int, temperature: float, d_min: float, d_max: float,
                w_min: float, w_max: float, theta_scale: float = 0.1):
    """One whole SAGE level, in place: `topk_confidence` of the frontier's draft logits, `sage_tree`,
    `expand_tree`, and the tree-mask rows of the new slots.

    Parameters
    ----------
    tokens, parents, logprobs, cum_logprobs : torch.Tensor
        `[B, Ncap]` tree state as in `expand_tree`, modified in place (contiguous).
    tree_mask : torch.Tensor or None
        `[B, R, C]` additive mask (float32/float16/bfloat16, last dim contiguous), row and column = tree
        slot, with `R, C >= slot_start + num_slots`; the rows of the frontier's ancestors-or-self must
        be written already. Row i of every slot written here becomes row `parents[b, i]` with column i
        set to 0 (a padding slot: `finfo.min` everywhere but column i), so a level's rows are ready for
        the draft forward that feeds it. None: no mask is written.
    logits : torch.Tensor
        `[B, F, V]` draft logits after the frontier slots `[frontier_start, frontier_start + F)`
        (padding slots, log-prob -inf, get no children).
    alpha : torch.Tensor or None
        `[B]` float32 confidence that shapes the tree (the paper's lagged alpha), or None to use each
        row's first frontier node's own confidence (zero-lag; at level 1 the frontier is the root).
    frontier_start, level, slot_start, num_slots : int
        Frontier slot range start (`frontier_start + F <= slot_start`), depth of the children created
        (>= 1), and the slots written (as `expand_tree`).
    k, temperature : int, float
        Top-k of the draft (as `topk_confidence`, also the widest node).
    d_min, d_max, w_min, w_max, theta_scale : float
        As `sage_tree`.

    Returns
    -------
    count : torch.Tensor
        `[B]` int64 real nodes written (as `expand_tree`).
    frontier_alpha : torch.Tensor
        `[B, F]` float32 confidence of every frontier node (at level 1: the root's alpha).
    max_depth : torch.Tensor
        `[B]` int64 `round(D(alpha))` (as `sage_tree`): no level deeper than it gets children.

    Examples
    --------
    >>> tokens = torch.zeros(1, 4, dtype=torch.long); parents = torch.full((1, 4), -1)
    >>> logprobs = torch.zeros(1, 4); cum = torch.zeros(1, 4)
    >>> mask = torch.full((1, 4, 4), torch.finfo(torch.float32).min); mask[0, 0, 0] = 0
    >>> count, alpha, max_depth = sage_level_(tokens, parents, logprobs, cum, mask, torch.tensor([[[0.0, 3.0, 2.9]]]),
    ...                                       None, 0, 1, 1, 3, 2, 1.0, 3, 8, 2, 10)
    >>> count, tokens, parents, mask[0, 2] == 0
    (tensor([2]), tensor([[0, 1, 2, 0]]), tensor([[-1,  0,  0, -1]]), tensor([ True, False,  True, False]))
    """
    return torch.ops.sage_ext.sage_level_(tokens, parents, logprobs, cum_logprobs, tree_mask, logits, alpha,
                                          frontier_start, level, slot_start, num_slots, k, temperature, d_min, d_max,
                                          w_min, w_max, theta_scale)


def expand_level_(tokens: torch.Tensor, parents: torch.Tensor, logprobs: torch.Tensor, cum_logprobs: torch.Tensor,
                  logits: torch.Tensor, frontier_start: int, k: int, temperature: float, slot_start: int,
                  num_slots: int):
    """One whole EAGLE-2 level, in place: `topk_confidence` of the frontier's draft logits, then `expand_tree`
    with every frontier slot allowed `k` children and no threshold (the best `num_slots` candidates by
    cumulative log-prob).

    Parameters
    ----------
    tokens, parents, logprobs, cum_logprobs : torch.Tensor
        `[B, Ncap]` tree state as in `expand_tree`, modified in place (contiguous).
    logits : torch.Tensor
        `[B, F, V]` draft logits of the frontier slots `[frontier_start, frontier_start + F)`.
    frontier_start, k, temperature, slot_start, num_slots : int, int, float, int, int
        As `sage_level_` (`frontier_start + F <= slot_start`).

    Returns
    -------
    count : torch.Tensor
        `[B]` int64 real nodes written.
    frontier_alpha : torch.Tensor
        `[B, F]` float32 confidence of every frontier node.

    Examples
    --------
    >>> tokens = torch.zeros(1, 4, dtype=torch.long); parents = torch.full((1, 4), -1)
    >>> logprobs = torch.zeros(1, 4); cum = torch.zeros(1, 4)
    >>> count, alpha = expand_level_(tokens, parents, logprobs, cum, torch.tensor([[[0.0, 3.0, 2.9]]]), 0, 2, 1.0, 1, 3)
    >>> count, tokens, parents
    (tensor([2]), tensor([[0, 1, 2, 0]]), tensor([[-1,  0,  0, -1]]))
    """
    return torch.ops.sage_ext.expand_level_(tokens, parents, logprobs, cum_logprobs, logits, frontier_start, k,
                                            temperature, slot_start, num_slots)


def gather_level_(tokens: torch.Tensor, logprobs: torch.Tensor, logits: torch.Tensor, child_index: torch.Tensor,
                  slot_start: int, k: int, temperature: float) -> torch.Tensor:
    """One level of a fixed tree (static trees, chains), in place: `topk_confidence` of the frontier's draft
    logits, then the children's tokens and log-probs picked from each row's flattened top-k.

    Parameters
    ----------
    tokens, logprobs : torch.Tensor
        `[B, Ncap]` int64 / float32 tree state, modified in place (contiguous): slot `slot_start + c` of row b
        gets entry `child_index[c]` of row b's flattened `[F * k]` top-k ids / log-probs.
    logits : torch.Tensor
        `[B, F, V]` draft logits of the frontier (the nodes whose children this level holds).
    child_index : torch.Tensor
        `[C]` int64, each in `[0, F * k)` (frontier position * k + rank).
    slot_start, k, temperature : int, int, float
        First slot written (>= 1, `slot_start + C <= Ncap`), top-k and temperature as `topk_confidence`.

    Returns
    -------
    torch.Tensor
        `frontier_alpha [B, F]` float32.

    Examples
    --------
    >>> tokens = torch.zeros(1, 4, dtype=torch.long); logprobs = torch.zeros(1, 4)
    >>> alpha = gather_level_(tokens, logprobs, torch.tensor([[[0.0, 3.0, 2.9]]]), torch.tensor([1, 0]), 1, 2, 1.0)
    >>> tokens
    tensor([[0, 2, 1, 0]])
    """
    return torch.ops.sage_ext.gather_level_(tokens, logprobs, logits, child_index, slot_start, k, temperature)


def rerank_select(tokens: torch.Tensor, parents: torch.Tensor, logprobs: torch.Tensor, cum_logprobs: torch.Tensor,
                  node_row: torch.Tensor, num_select: int):
    """EAGLE-2's final selection as a new tree: `rerank_tree` over a built tree, then the kept nodes' tokens,
    parents, log-probs and draft rows.

    Parameters
    ----------
    tokens, parents : torch.Tensor
        `[B, N]` int64 built tree.
    logprobs, cum_logprobs : torch.Tensor
        `[B, N]` float32 conditional and cumulative draft log-probs (the score of `rerank_tree`).
    node_row : torch.Tensor
        `[B, M >= N]` int64 draft-cache row of every node (-1: not fed to the draft).
    num_select : int
        Nodes kept, the root included (`1 <= num_select <= N`).

    Returns
    -------
    tokens, parents, logprobs : torch.Tensor
        `[B, S]` the kept nodes in index order (parents as positions in the selection); padding positions
        (fewer real nodes than `num_select`) get token 0, parent -1, log-prob -inf.
    node_row : torch.Tensor
        `[B, S + 1]` int64 the kept nodes' rows (-1 for padding), then -1 (so a -1 of `accepted` picks -1).

    Examples
    --------
    >>> parents = torch.tensor([[-1, 0, 0, 1]]); cum = torch.tensor([[0.0, -0.5, -2.0, -0.7]])
    >>> rerank_select(torch.tensor([[9, 5, 6, 7]]), parents, cum, cum, torch.tensor([[0, 1, 2, -1]]), 3)
    (tensor([[9, 5, 7]]), tensor([[-1,  0,  1]]), tensor([[ 0.0000, -0.5000, -0.7000]]), tensor([[ 0,  1, -1, -1]]))
    """
    return torch.ops.sage_ext.rerank_select(tokens, parents, logprobs, cum_logprobs, node_row, num_select)


def tree_mask_feed_(tree_mask: torch.Tensor, parents: torch.Tensor, node_row: torch.Tensor | None, slot_start: int,
                    first_row: int, count: int) -> None:
    """The draft's tree-mask rows of a feed (the slots `[slot_start, slot_start + count)` processed as draft rows
    `[first_row, first_row + count)`), in place: each row is its parent's row with its own column opened.

    Parameters
    ----------
    tree_mask : torch.Tensor
        `[B, R, C]` additive mask (float32/float16/bfloat16, last dim contiguous), row and column = draft row;
        row `R - 1` is the padding row (all `finfo.min`). Needs `first_row + count < R` and `<= C`.
    parents : torch.Tensor
        `[B, Ncap]` int64 tree.
    node_row : torch.Tensor or None
        `[B, >= Ncap]` int64 draft row of every slot fed before (the parents' rows); None: slot i is row i.
        A parent that is padding (-1), was not fed, or whose row is not before `first_row` gives the padding row.
    slot_start, first_row, count : int

    Examples
    --------
    >>> mask = torch.full((1, 4, 3), torch.finfo(torch.float32).min); mask[0, 0, 0] = 0
    >>> tree_mask_feed_(mask, torch.tensor([[-1, 0, 0]]), None, 1, 1, 2)
    >>> (mask[0, :3] == 0).int()
    tensor([[1, 0, 0],
            [1, 1, 0],
            [1, 0, 1]], dtype=torch.int32)
    """
    torch.ops.sage_ext.tree_mask_feed_(tree_mask, parents, node_row, slot_start, first_row, count)


def commit_tree_(tokens: torch.Tensor, parents: torch.Tensor, accepted: torch.Tensor, accept_len: torch.Tensor,
                 bonus: torch.Tensor, sequence: torch.Tensor, seq_start: int, target_caches: Sequence[torch.Tensor],
                 target_past: int, draft_caches: Sequence[torch.Tensor], draft_rows: torch.Tensor | None,
                 draft_past: int, alpha: torch.Tensor | None) -> torch.Tensor:
    """Commit a verified tree in one call: the new tokens into a sequence buffer, `kv_compact_` of the
    target's and the draft's caches, and everything the host needs after the step in one tensor.

    Parameters
    ----------
    tokens, parents : torch.Tensor
        `[B, N]` int64 verified tree.
    accepted, accept_len, bonus : torch.Tensor
        The outputs of `verify_greedy` / `verify_sampling` for it.
    sequence : torch.Tensor
        `[B, S]` int64 token buffer (last dim contiguous), written in place: the new tokens (the
        accepted path's tokens after the root, then the bonus) go to
        `sequence[b, seq_start : seq_start + accept_len + 1]`; needs `seq_start + N <= S`.
    target_caches, target_past : list of torch.Tensor, int
        As `kv_compact_(target_caches, accepted, target_past)` (the tree was forwarded at rows
        `target_past ..`).
    draft_caches, draft_rows, draft_past : list of torch.Tensor, torch.Tensor or None, int
        `draft_rows [B, M >= N]` int64: the draft-cache row (relative to `draft_past`) of every tree
        node the draft processed, -1 for the others; the accepted nodes the draft holds must be a
        prefix of the path. Their rows are compacted like `kv_compact_` does with `accepted`.
        `draft_rows` None: the draft holds none (`draft_caches` must then be empty).
    alpha : torch.Tensor or None
        `[B]` float32 value to pass to the host with the rest (e.g. the root's confidence).

    Returns
    -------
    torch.Tensor
        `readback [B, 4 + N]` int64: `accept_len`, the accepted nodes the draft holds, the real
        (non-padding) nodes besides the root, the float32 bits of `alpha` as a signed int32 (0 when
        None), then the `accept_len + 1` new tokens (-1 after them). One `.tolist()` reads the step.

    Examples
    --------
    >>> tokens = torch.tensor([[5, 7, 8, 9]]); parents = torch.tensor([[-1, 0, 0, 2]])
    >>> accepted, accept_len, bonus = verify_greedy(tokens, parents, torch.tensor([[8, 1, 9, 4]]))
    >>> sequence = torch.zeros(1, 8, dtype=torch.long)
    >>> keys = torch.arange(6.0).reshape(1, 1, 6, 1)
    >>> commit_tree_(tokens, parents, accepted, accept_len, bonus, sequence, 3, [keys], 2, [], None, 0, None)
    tensor([[ 2,  0,  3,  0,  8,  9,  4, -1]])
    >>> sequence, keys.flatten()
    (tensor([[0, 0, 0, 8, 9, 4, 0, 0]]), tensor([0., 1., 2., 4., 5., 5.]))
    """
    return torch.ops.sage_ext.commit_tree_(tokens, parents, accepted, accept_len, bonus, sequence, seq_start,
                                           list(target_caches), target_past, list(draft_caches), draft_rows,
                                           draft_past, alpha)


# --------------------------------------------------------------------------------------------
# fake (meta) implementations: output shapes from input shapes only
# --------------------------------------------------------------------------------------------
@torch.library.register_fake("sage_ext::topk_confidence")
def _topk_confidence_fake(logits, k, temperature=1.0):
    rows = logits.shape[0]
    return (logits.new_empty((rows,), dtype=torch.float32), logits.new_empty((rows, k), dtype=torch.float32),
            logits.new_empty((rows, k), dtype=torch.int64))


@torch.library.register_fake("sage_ext::build_static_tree")
def _build_static_tree_fake(paths):
    num_nodes = paths.shape[0] + 1
    return tuple(paths.new_empty((num_nodes,), dtype=torch.int64) for _ in range(3))


@torch.library.register_fake("sage_ext::sage_tree")
def _sage_tree_fake(alpha, frontier_logprobs, level, k, d_min, d_max, w_min, w_max, theta_scale=0.1):
    batch = alpha.shape[0]
    return (frontier_logprobs.new_empty(frontier_logprobs.shape, dtype=torch.int64),
            alpha.new_empty((batch,), dtype=torch.float32), alpha.new_empty((batch,), dtype=torch.int64))


@torch.library.register_fake("sage_ext::expand_tree")
def _expand_tree_fake(tokens, parents, logprobs, cum_logprobs, frontier, topk_logprobs, topk_ids, widths,
                      min_cum_logprob, slot_start, num_slots):
    return tokens.new_empty((tokens.shape[0],), dtype=torch.int64)


@torch.library.register_fake("sage_ext::rerank_tree")
def _rerank_tree_fake(parents, cum_logprobs, num_select):
    shape = (parents.shape[0], num_select)
    return parents.new_empty(shape, dtype=torch.int64), parents.new_empty(shape, dtype=torch.int64)


@torch.library.register_fake("sage_ext::tree_buffers")
def _tree_buffers_fake(parents, past_len, mask_dtype=torch.float32):
    batch, num_nodes = parents.shape
    links = lambda: parents.new_empty((batch, num_nodes), dtype=torch.int64)  # noqa: E731
    return (links(), links(), links(), links(),
            parents.new_empty((batch, num_nodes, num_nodes), dtype=torch.int64),
            parents.new_empty((batch, num_nodes), dtype=torch.bool),
            parents.new_empty((batch, 1, num_nodes, past_len + num_nodes), dtype=mask_dtype),
            parents.new_empty((batch, num_nodes, (num_nodes + 7) // 8), dtype=torch.uint8))


def _verify_fake(tokens):
    batch, num_nodes = tokens.shape
    return (tokens.new_empty((batch, num_nodes), dtype=torch.int64), tokens.new_empty((batch,), dtype=torch.int64),
            tokens.new_empty((batch,), dtype=torch.int64))


@torch.library.register_fake("sage_ext::verify_greedy")
def _verify_greedy_fake(tokens, parents, target):
    return _verify_fake(tokens)


@torch.library.register_fake("sage_ext::verify_sampling")
def _verify_sampling_fake(tokens, parents, target_probs, draft_probs, uniforms):
    return _verify_fake(tokens)


@torch.library.register_fake("sage_ext::verify_traversal")
def _verify_traversal_fake(tokens, parents, target_probs, draft_probs, uniforms):
    return _verify_fake(tokens)


@torch.library.register_fake("sage_ext::kv_compact_")
def _kv_compact_fake(caches, accepted, past_len):
    return None


@torch.library.register_fake("sage_ext::sage_level_")
def _sage_level_fake(tokens, parents, logprobs, cum_logprobs, tree_mask, logits, alpha, frontier_start, level,
                     slot_start, num_slots, k, temperature, d_min, d_max, w_min, w_max, theta_scale=0.1):
    batch, num_frontier = logits.shape[0], logits.shape[1]
    return (tokens.new_empty((batch,), dtype=torch.int64),
            tokens.new_empty((batch, num_frontier), dtype=torch.float32),
            tokens.new_empty((batch,), dtype=torch.int64))


@torch.library.register_fake("sage_ext::commit_tree_")
def _commit_tree_fake(tokens, parents, accepted, accept_len, bonus, sequence, seq_start, target_caches, target_past,
                      draft_caches, draft_rows, draft_past, alpha):
    batch, num_nodes = tokens.shape
    return tokens.new_empty((batch, 4 + num_nodes), dtype=torch.int64)


@torch.library.register_fake("sage_ext::expand_level_")
def _expand_level_fake(tokens, parents, logprobs, cum_logprobs, logits, frontier_start, k, temperature, slot_start,
                       num_slots):
    batch, num_frontier = logits.shape[0], logits.shape[1]
    return (tokens.new_empty((batch,), dtype=torch.int64),
            tokens.new_empty((batch, num_frontier), dtype=torch.float32))


@torch.library.register_fake("sage_ext::gather_level_")
def _gather_level_fake(tokens, logprobs, logits, child_index, slot_start, k, temperature):
    return tokens.new_empty((logits.shape[0], logits.shape[1]), dtype=torch.float32)


@torch.library.register_fake("sage_ext::rerank_select")
def _rerank_select_fake(tokens, parents, logprobs, cum_logprobs, node_row, num_select):
    batch = tokens.shape[0]
    return (tokens.new_empty((batch, num_select), dtype=torch.int64),
            tokens.new_empty((batch, num_select), dtype=torch.int64),
            tokens.new_empty((batch, num_select), dtype=torch.float32),
            tokens.new_empty((batch, num_select + 1), dtype=torch.int64))


@torch.library.register_fake("sage_ext::tree_mask_feed_")
def _tree_mask_feed_fake(tree_mask, parents, node_row, slot_start, first_row, count):
    return None
