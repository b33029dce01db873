"""Plain-PyTorch reference implementations ("oracles") of every `sage_ext` op.

Each function here has exactly the Python signature of its wrapper in `sage_ext.ops` and computes
what docs/OPS.md specifies, written for readability rather than speed: loops over tree nodes are
plain Python, only vocabulary-wide work (softmax, top-k, argmax, cumulative sums) is vectorized so
the oracle stays usable at V = 152k. The test suite compares the C++/CUDA ops against these
functions; the benchmarks time them as the "what you would write without the extension" baseline.

Conventions (see docs/OPS.md): B batch, N tree nodes, node 0 is the root (parent -1), a node i > 0
with parent -1 is padding (an empty slot), parents are topological (parents[b, i] < i).
"""
from __future__ import annotations

import math

import torch

__all__ = [
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

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _round_half_up(x: torch.Tensor) -> torch.Tensor:
    """The contract's rounding rule, floor(x + 0.5), as int64."""
    return torch.floor(x + 0.5).to(torch.int64)


def _f32(x: float) -> torch.Tensor:
    """A Python scalar as a float32 0-d tensor, so formulas round like the float32 kernels do."""
    return torch.tensor(x, dtype=torch.float32)


def _is_padding(parents_row: list[int], i: int) -> bool:
    return i > 0 and parents_row[i] == -1


def _check_parents(parents: torch.Tensor) -> None:
    """Raise if `parents` [B, N] is not a valid topological tree (root first, parent < index)."""
    if parents.dim() != 2 or parents.dtype != torch.int64:
        raise ValueError(f"parents must be a [B, N] int64 tensor, got {tuple(parents.shape)} {parents.dtype}")
    if parents.shape[1] < 1:
        raise ValueError("parents must have at least one node (the root)")
    for b, row in enumerate(parents.tolist()):
        if row[0] != -1:
            raise ValueError(f"parents[{b}, 0] must be -1 (the root), got {row[0]}")
        for i in range(1, len(row)):
            if row[i] < -1 or row[i] >= i or (row[i] > 0 and row[row[i]] == -1):
                raise ValueError(f"parents[{b}, {i}] = {row[i]} must be -1 (padding) or an earlier real node")


def _children(parents_row: list[int]) -> list[list[int]]:
    """children[u] = indices of u's children in increasing order (padding is nobody's child)."""
    children: list[list[int]] = [[] for _ in parents_row]
    for i in range(1, len(parents_row)):
        if parents_row[i] >= 0:
            children[parents_row[i]].append(i)
    return children


# --------------------------------------------------------------------------------------------
# confidence
# --------------------------------------------------------------------------------------------
def topk_confidence(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """SAGE confidence alpha plus the top-k log-probabilities and token ids of every row.

    z = logits / temperature in float32 (NaN -> -inf, +inf -> largest finite float32),
    topk_logprobs = log_softmax(z) of the k largest z (descending, ties -> lower id),
    alpha = clamp(1 - H(renormalized top-k) / log k, 0, 1), alpha = 1 when k == 1.
    A row that is entirely -inf/NaN gives alpha 0, log-probs -inf and ids 0..k-1.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [R, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits must be float32/float16/bfloat16, got {logits.dtype}")
    num_rows, vocab = logits.shape
    if not 1 <= k <= min(vocab, 64):
        raise ValueError(f"k must be in [1, min(V, 64)] = [1, {min(vocab, 64)}], got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    f32 = torch.finfo(torch.float32)
    z = logits.float() / temperature
    z = torch.nan_to_num(z, nan=-math.inf, posinf=f32.max, neginf=-math.inf)
    logprobs = torch.log_softmax(z, dim=-1)

    # The k largest with ties to the lower id: every token at least as large as the k-th largest
    # value is a candidate; a stable descending sort of the candidates (in id order) ranks them.
    kth_value = torch.topk(z, k, dim=-1).values[:, -1:]
    topk_ids = torch.empty(num_rows, k, dtype=torch.int64, device=logits.device)
    for row in range(num_rows):
        candidates = torch.nonzero(z[row] >= kth_value[row]).flatten()
        order = torch.sort(z[row, candidates], descending=True, stable=True).indices
        topk_ids[row] = candidates[order[:k]]
    topk_logprobs = logprobs.gather(1, topk_ids)

    # Entropy of the renormalized top-k distribution; 0 log 0 counts as 0.
    log_p = topk_logprobs - torch.logsumexp(topk_logprobs, dim=-1, keepdim=True)
    p = log_p.exp()
    entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
    if k == 1:
        alpha = torch.ones(num_rows, dtype=torch.float32, device=logits.device)
    else:
        alpha = (1.0 - entropy / math.log(k)).clamp(0.0, 1.0)

    dead = (z == -math.inf).all(dim=-1)  # rows without a single finite logit
    alpha = torch.where(dead, torch.zeros_like(alpha), alpha)
    topk_logprobs = torch.where(dead[:, None], torch.full_like(topk_logprobs, -math.inf), topk_logprobs)
    return alpha, topk_logprobs, topk_ids


# --------------------------------------------------------------------------------------------
# tree construction
# --------------------------------------------------------------------------------------------
def build_static_tree(paths: torch.Tensor):
    """Tree from rank paths: `paths [P, L]` int64, each row a path of child ranks, -1 padded.

    Returns (parents, ranks, depth), each [P + 1] int64: root first (parent -1, rank -1, depth 0),
    then the nodes sorted by depth, then lexicographically by rank path.
    """
    if paths.dim() != 2 or paths.dtype != torch.int64:
        raise ValueError(f"paths must be a [P, L] int64 tensor, got {tuple(paths.shape)} {paths.dtype}")
    rank_paths: list[tuple[int, ...]] = []
    for row in paths.tolist():
        length = next((j for j, r in enumerate(row) if r == -1), len(row))
        path = tuple(row[:length])
        if not path:
            raise ValueError("paths rows must be non-empty")
        if any(r != -1 for r in row[length:]):
            raise ValueError("paths rows must be padded with -1 only at the end")
        if any(not 0 <= r < 64 for r in path):
            raise ValueError(f"paths ranks must be in [0, 64), got {list(path)}")
        rank_paths.append(path)
    if len(set(rank_paths)) != len(rank_paths):
        raise ValueError("paths must not contain duplicates")
    known = set(rank_paths)
    for path in rank_paths:
        if len(path) > 1 and path[:-1] not in known:
            raise ValueError(f"paths must be ancestor-closed: {list(path[:-1])} missing for {list(path)}")

    ordered = sorted(rank_paths, key=lambda path: (len(path), path))
    index_of = {(): 0}
    parents, ranks, depth = [-1], [-1], [0]
    for i, path in enumerate(ordered, start=1):
        index_of[path] = i
        parents.append(index_of[path[:-1]])
        ranks.append(path[-1])
        depth.append(len(path))
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=paths.device)  # noqa: E731
    return as_tensor(parents), as_tensor(ranks), as_tensor(depth)


def sage_tree(alpha, frontier_logprobs, level, k, d_min, d_max, w_min, w_max, theta_scale=0.1):
    """SAGE Eq. 10-12 for the level of children created at depth `level` (>= 1).

    D = d_min + alpha (d_max - d_min), W = w_min + (1 - alpha)(w_max - w_min), max_depth = round(D);
    widths = clamp(round(W), 1, k) at level 1, clamp(round(W (0.5 + P) / level), 1, k) deeper,
    with P = exp(frontier_logprob); 0 for empty (-inf) slots and when level > max_depth;
    min_cum_logprob = log(theta_scale * level / D).
    Returns (widths [B, F] int64, min_cum_logprob [B] float32, max_depth [B] int64).
    """
    alpha = alpha.float()
    frontier_logprobs = frontier_logprobs.float()
    depth = _f32(d_min) + alpha * (_f32(d_max) - _f32(d_min))
    width = _f32(w_min) + (1.0 - alpha) * (_f32(w_max) - _f32(w_min))
    max_depth = _round_half_up(depth)

    if level <= 1:
        widths = _round_half_up(width)[:, None].expand_as(frontier_logprobs)
    else:
        parent_prob = frontier_logprobs.exp()
        widths = _round_half_up(width[:, None] * (0.5 + parent_prob) / float(level))
    widths = widths.clamp(1, k)
    empty = ~(frontier_logprobs > -math.inf)  # -inf (or NaN) marks an empty slot
    too_deep = (level > max_depth)[:, None]
    widths = torch.where(empty | too_deep, torch.zeros_like(widths), widths).contiguous()

    min_cum_logprob = torch.log(_f32(theta_scale) * float(level) / depth)
    return widths, min_cum_logprob, max_depth


def expand_tree(tokens, parents, logprobs, cum_logprobs, frontier, topk_logprobs, topk_ids, widths,
                min_cum_logprob, slot_start, num_slots):
    """One best-first level of tree expansion, written in place into slots [slot_start, slot_start + num_slots).

    Candidates (f, r): frontier[b, f] >= 0, r < widths[b, f], cumulative log-prob
    c = cum_logprobs[b, frontier[b, f]] + topk_logprobs[b, f, r], kept iff c > min_cum_logprob[b]
    and c > -inf. Best c first (ties -> smaller (f, r)) fill the slots; unused slots become padding
    (token 0, parent -1, logprob -inf, cum -inf). Returns count [B] int64, the real nodes written.
    """
    batch, capacity = parents.shape
    if not (0 <= slot_start and num_slots >= 0 and slot_start + num_slots <= capacity):
        raise ValueError(f"slot_start + num_slots must be <= Ncap = {capacity}, got {slot_start} + {num_slots}")
    num_frontier, top_k = topk_ids.shape[1], topk_ids.shape[2]
    if ((frontier < -1) | (frontier >= slot_start)).any():
        raise ValueError(f"frontier entries must be -1 or an existing node in [0, slot_start = {slot_start})")
    counts = []
    for b in range(batch):
        candidates = []  # (-c, f, r): sorting this tuple gives c descending, then smaller (f, r)
        for f in range(num_frontier):
            node = int(frontier[b, f])
            if node < 0:
                continue
            for r in range(min(max(int(widths[b, f]), 0), top_k)):
                c = float((cum_logprobs[b, node] + topk_logprobs[b, f, r]).float())  # float32 sum
                if c > float(min_cum_logprob[b]) and c > -math.inf:
                    candidates.append((-c, f, r))
        candidates.sort()
        chosen = candidates[:num_slots]
        for slot in range(slot_start, slot_start + num_slots):
            if slot - slot_start < len(chosen):
                neg_c, f, r = chosen[slot - slot_start]
                tokens[b, slot] = topk_ids[b, f, r]
                parents[b, slot] = frontier[b, f]
                logprobs[b, slot] = topk_logprobs[b, f, r]
                cum_logprobs[b, slot] = -neg_c
            else:
                tokens[b, slot] = 0
                parents[b, slot] = -1
                logprobs[b, slot] = -math.inf
                cum_logprobs[b, slot] = -math.inf
        counts.append(len(chosen))
    return torch.tensor(counts, dtype=torch.int64, device=parents.device)


def rerank_tree(parents, cum_logprobs, num_select):
    """EAGLE-2 global top-N: keep the root and the `num_select - 1` best real nodes.

    Score s[0] = +inf, s[i] = min(cum_logprobs[i], s[parent[i]]) for a real node (so every top set
    is ancestor-closed); padding is never selected; ties -> lower index.
    Returns keep [B, num_select] (selected indices ascending, -1 padded) and new_parents
    [B, num_select] (each kept node's parent as a position inside keep; root and padding -1).
    """
    _check_parents(parents)
    batch, num_nodes = parents.shape
    if not 1 <= num_select <= num_nodes:
        raise ValueError(f"num_select must be in [1, N] = [1, {num_nodes}], got {num_select}")
    keep = torch.full((batch, num_select), -1, dtype=torch.int64, device=parents.device)
    new_parents = torch.full_like(keep, -1)
    for b in range(batch):
        row = parents[b].tolist()
        cum = [-math.inf if math.isnan(c) else c for c in cum_logprobs[b].float().tolist()]  # NaN ranks last
        score = [math.inf] + [0.0] * (num_nodes - 1)
        real = []
        for i in range(1, num_nodes):
            if not _is_padding(row, i):
                score[i] = min(cum[i], score[row[i]])
                real.append(i)
        best = sorted(real, key=lambda i: (-score[i], i))[: num_select - 1]
        selected = sorted([0] + best)
        position = {node: pos for pos, node in enumerate(selected)}
        for pos, node in enumerate(selected):
            keep[b, pos] = node
            if node > 0:
                new_parents[b, pos] = position[row[node]]
    return keep, new_parents


# --------------------------------------------------------------------------------------------
# tree buffers
# --------------------------------------------------------------------------------------------
def tree_buffers(parents, past_len, mask_dtype=torch.float32):
    """Everything a tree forward and its verification need, derived from `parents` [B, N].

    Returns (depth, positions, first_child, next_sibling, paths, is_leaf, float_mask, packed_mask);
    see docs/OPS.md for the exact layout of each.
    """
    _check_parents(parents)
    if past_len < 0:
        raise ValueError(f"past_len must be >= 0, got {past_len}")
    if mask_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"mask_dtype must be float32/float16/bfloat16, got {mask_dtype}")
    batch, num_nodes = parents.shape
    device = parents.device
    depth = torch.zeros(batch, num_nodes, dtype=torch.int64)
    first_child = torch.full((batch, num_nodes), -1, dtype=torch.int64)
    next_sibling = torch.full((batch, num_nodes), -1, dtype=torch.int64)
    paths = torch.full((batch, num_nodes, num_nodes), -1, dtype=torch.int64)
    is_leaf = torch.zeros(batch, num_nodes, dtype=torch.bool)
    ancestor = torch.zeros(batch, num_nodes, num_nodes, dtype=torch.bool)  # [b, i, j]: j is ancestor-or-self of i

    for b in range(batch):
        row = parents[b].tolist()
        children = _children(row)
        for i in range(num_nodes):
            ancestor[b, i, i] = True
            if _is_padding(row, i):
                continue
            if i > 0:
                depth[b, i] = depth[b, row[i]] + 1
                ancestor[b, i] |= ancestor[b, row[i]]
            chain = ancestor[b, i].nonzero().flatten()  # ancestors have smaller indices: root..i
            paths[b, i, : len(chain)] = chain
            is_leaf[b, i] = not children[i]
            if children[i]:
                first_child[b, i] = children[i][0]
            for older, younger in zip(children[i], children[i][1:]):
                next_sibling[b, older] = younger

    blocked = torch.finfo(mask_dtype).min
    float_mask = torch.zeros(batch, 1, num_nodes, past_len + num_nodes, dtype=mask_dtype)
    float_mask[:, 0, :, past_len:] = torch.where(ancestor, 0.0, blocked).to(mask_dtype)

    num_bytes = (num_nodes + 7) // 8
    padded = torch.zeros(batch, num_nodes, num_bytes * 8, dtype=torch.int64)
    padded[..., :num_nodes] = ancestor.to(torch.int64)
    bit_values = 2 ** torch.arange(8, dtype=torch.int64)  # LSB first
    packed_mask = (padded.view(batch, num_nodes, num_bytes, 8) * bit_values).sum(-1).to(torch.uint8)

    positions = past_len + depth
    outputs = (depth, positions, first_child, next_sibling, paths, is_leaf, float_mask, packed_mask)
    return tuple(t.to(device) for t in outputs)


# --------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------
def _walk_outputs(batch, num_nodes, walks, bonuses, device):
    accepted = torch.full((batch, num_nodes), -1, dtype=torch.int64)
    for b, walk in enumerate(walks):
        accepted[b, : len(walk)] = torch.tensor(walk, dtype=torch.int64)
    accept_len = torch.tensor([len(walk) - 1 for walk in walks], dtype=torch.int64)
    bonus = torch.tensor(bonuses, dtype=torch.int64)
    return accepted.to(device), accept_len.to(device), bonus.to(device)


def verify_greedy(tokens, parents, target):
    """Greedy tree verification: follow the child whose token is the target's argmax.

    `target` is the target's argmax after each node ([B, N] int64) or its logits ([B, N, V],
    argmax taken inside, ties -> lowest id). Returns accepted [B, N] (path node indices from the
    root, -1 padded), accept_len [B] (accepted draft tokens) and bonus [B] (argmax at the last node).
    """
    _check_parents(parents)
    if target.dim() == 3:
        argmax = target.float().argmax(dim=-1)  # torch returns the first maximal index
    else:
        argmax = target
    batch, num_nodes = parents.shape
    walks, bonuses = [], []
    for b in range(batch):
        children = _children(parents[b].tolist())
        row_tokens, row_argmax = tokens[b].tolist(), argmax[b].tolist()
        walk = [0]
        while True:
            u = walk[-1]
            match = next((c for c in children[u] if row_tokens[c] == row_argmax[u]), None)
            if match is None:
                break
            walk.append(match)
        walks.append(walk)
        bonuses.append(row_argmax[walk[-1]])
    return _walk_outputs(batch, num_nodes, walks, bonuses, tokens.device)


def _mass(p: torch.Tensor) -> torch.Tensor:
    """sum(p) accumulated in float64, returned as float32 (the sums of the op are exact to float32)."""
    return p.double().sum().float()


def _sample_index(p: torch.Tensor, mass: torch.Tensor, uniform: torch.Tensor) -> int:
    """Smallest x with cumsum(p)[x] > uniform * mass (float64 accumulation); the last positive entry
    when rounding leaves none; -1 when none is positive."""
    cumulative = torch.cumsum(p.double(), dim=0)
    threshold = uniform.double() * mass.double()
    index = int(torch.searchsorted(cumulative, threshold, right=True))
    if index < p.numel():
        return index
    positive = torch.nonzero(p > 0).flatten()
    return int(positive[-1]) if positive.numel() else -1


def _bonus(residual: torch.Tensor, mass: torch.Tensor, target_row: torch.Tensor, uniform: torch.Tensor) -> int:
    """The bonus token: drawn from the residual, or from the target row itself when the residual vanished
    numerically (its mass is not positive, or only float rounding is left on zeroed tokens: no positive entry);
    -1 when the target row has no positive entry either (not a distribution)."""
    index = _sample_index(residual, mass, uniform) if mass > 0 else -1
    if index < 0:
        target_row = target_row.float()
        index = _sample_index(target_row, _mass(target_row), uniform)
    return index


def verify_sampling(tokens, parents, target_probs, draft_probs=None, generator=None):
    """Lossless tree rejection sampling (SpecInfer rule; q = 1 for deterministic top-k drafts).

    Draws `uniforms = torch.rand(B, N, generator=generator, device=tokens.device)` exactly as the
    `sage_ext.ops` wrapper does: uniforms[b, c] decides child c, uniforms[b, 0] the bonus token.
    At node u the residual starts as p = target_probs[u] with mass m = sum(p); children are tried in
    increasing index. Without draft_probs, child token x is accepted iff uniform < p[x] / m, else
    p[x] is removed from the residual. With draft_probs (q = draft_probs[u]), x is accepted iff
    q[x] == 0 or uniform < min(1, (p[x] / m) / q[x]), else p = relu(p / m - q). When no child is
    accepted the bonus is drawn from the residual (from target_probs[u] if the residual vanished).
    Returns (accepted, accept_len, bonus) laid out as in `verify_greedy`.
    """
    _check_parents(parents)
    batch, num_nodes = parents.shape
    uniforms = torch.rand(batch, num_nodes, generator=generator, device=tokens.device).cpu()
    target_probs = target_probs.cpu()
    draft_probs = None if draft_probs is None else draft_probs.cpu()
    walks, bonuses = [], []
    for b in range(batch):
        children = _children(parents[b].tolist())
        u = 0
        walk = [0]
        while True:
            p = target_probs[b, u].float().clone()
            mass = _mass(p)
            accepted_child = None
            for c in children[u]:
                x = int(tokens[b, c])
                if draft_probs is None:
                    if uniforms[b, c] < p[x] / mass:
                        accepted_child = c
                        break
                    mass = mass - p[x]
                    p[x] = 0.0
                else:
                    q = draft_probs[b, u].float()
                    if q[x] == 0 or uniforms[b, c] < torch.clamp((p[x] / mass) / q[x], max=1.0):
                        accepted_child = c
                        break
                    p = torch.relu(p / mass - q)
                    mass = _mass(p)
            if accepted_child is None:
                break
            u = accepted_child
            walk.append(u)
        walks.append(walk)
        bonuses.append(_bonus(p, mass, target_probs[b, u], uniforms[b, 0]))
    return _walk_outputs(batch, num_nodes, walks, bonuses, tokens.device)


def verify_traversal(tokens, parents, target_probs, draft_probs=None, generator=None):
    """Traversal Verification (Weng et al., NeurIPS 2025): the tree is verified leaf to root, a path
    at a time, with the draft model of `verify_sampling` (children of u drawn independently from
    q = draft_probs[u], or fixed tokens when draft_probs is None: q = the point mass on the child's token).

    Uniforms as `verify_sampling` (uniforms[b, c] decides node c, uniforms[b, 0] the bonus). Post-order
    depth-first walk from the root, children in increasing index. Every open node u carries alpha_u
    (the root: 1) and a residual r_u with mass m_u, p_u = r_u / m_u; r_u starts as target_probs[u].
    - Entering child c of u (token x): alpha_c = 0 if alpha_u or m_u is not positive; else, with
      w = alpha_u * (r_u[x] / m_u), alpha_c = clamp(w, 0, 1) without q, and with q = draft_probs[u]:
      1 if q[x] == 0 and w > 0, 0 if q[x] == 0 otherwise, else clamp(w / q[x], 0, 1).
    - Once all of u's children were entered and rejected, u is decided: the root is accepted; another
      node is accepted iff uniforms[b, u] < alpha_u, else it is rejected and its parent updated.
    - Rejecting child c of u (skipped if alpha_u or m_u is not positive): the new residual is
      relu(alpha_u p_u - q); without q that is r_u with r_u[x] zeroed, m_u' = max(0, m_u - r_u[x]); with
      q it is proportional to relu(target_probs[u] - coef_u * q) where coef_u grows by m_u / alpha_u (from
      0), m_u' = its sum. Then R = alpha_u * (m_u' / m_u) and alpha_u' = R / ((1 - alpha_u) + R)
      (1 if that denominator is 0 and alpha_u == 1, else 0).
    - The accepted node's bonus is drawn from its residual (threshold uniforms[b, 0] * m_u), or from
      target_probs[u] itself when m_u is not positive.
    Returns (accepted, accept_len, bonus) laid out as in `verify_greedy`.
    """
    _check_parents(parents)
    batch, num_nodes = parents.shape
    uniforms = torch.rand(batch, num_nodes, generator=generator, device=tokens.device).cpu()
    target_probs = target_probs.cpu()
    draft_probs = None if draft_probs is None else draft_probs.cpu()
    one, zero = _f32(1.0), _f32(0.0)
    walks, bonuses = [], []
    for b in range(batch):
        children = _children(parents[b].tolist())
        row_tokens = tokens[b].tolist()
        target = target_probs[b].float()
        draft = None if draft_probs is None else draft_probs[b].float()
        alpha = {0: one}
        coef, mass, zeroed = {}, {}, {}

        def open_node(u):
            coef[u], mass[u], zeroed[u] = zero, _mass(target[u]), set()

        def residual(u):
            if draft is None:
                r = target[u].clone()
                if zeroed[u]:
                    r[sorted(zeroed[u])] = 0.0
                return r
            return target[u] if coef[u] == 0 else torch.clamp(target[u] - coef[u] * draft[u], min=0.0)

        def residual_at(u, x):
            if draft is None:
                return zero if x in zeroed[u] else target[u, x]
            return torch.clamp(target[u, x] - coef[u] * draft[u, x], min=0.0)

        def child_alpha(u, x):
            if not (alpha[u] > 0 and mass[u] > 0):
                return zero
            weight = alpha[u] * (residual_at(u, x) / mass[u])
            if draft is not None:
                if draft[u, x] == 0:
                    return one if weight > 0 else zero
                weight = weight / draft[u, x]
            return torch.nan_to_num(weight, nan=0.0).clamp(0.0, 1.0)

        def reject_child(u, x):
            if not (alpha[u] > 0 and mass[u] > 0):
                return
            if draft is None:
                new_mass = torch.clamp(mass[u] - residual_at(u, x), min=0.0)
                zeroed[u].add(x)
            else:
                coef[u] = coef[u] + mass[u] / alpha[u]
                new_mass = _mass(residual(u))
            kept = alpha[u] * (new_mass / mass[u])
            denominator = (one - alpha[u]) + kept
            if denominator > 0:
                alpha[u] = kept / denominator
            else:
                alpha[u] = one if alpha[u] >= 1 else zero
            mass[u] = new_mass

        open_node(0)
        stack = [(0, iter(children[0]))]  # the open nodes, root first, each with its children not yet entered
        while True:
            u, pending = stack[-1]
            c = next(pending, None)
            if c is not None:
                alpha[c] = child_alpha(u, row_tokens[c])
                open_node(c)
                stack.append((c, iter(children[c])))
                continue
            if u == 0 or uniforms[b, u] < alpha[u]:
                break
            stack.pop()
            reject_child(stack[-1][0], row_tokens[u])
        walks.append([node for node, _ in stack])
        accepted_node = stack[-1][0]
        m = mass[accepted_node]
        bonuses.append(_bonus(residual(accepted_node) if m > 0 else target[accepted_node], m, target[accepted_node],
                              uniforms[b, 0]))
    return _walk_outputs(batch, num_nodes, walks, bonuses, tokens.device)


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------
def kv_compact_(caches, accepted, past_len):
    """Move the accepted tree rows of every cache [B, H, L, D] to contiguous positions, in place.

    For each b and j with accepted[b, j] >= 0 (in increasing j): row past_len + j <- row
    past_len + accepted[b, j]. Returns None; the caller then crops to past_len + accept_len + 1.
    """
    rows = accepted.tolist()
    for cache in caches:
        for b, row in enumerate(rows):
            for j, node in enumerate(row):
                if node < 0:
                    continue
                if node < j or past_len + node >= cache.shape[2]:
                    raise ValueError(f"accepted[{b}, {j}] = {node} is out of range")
                cache[b, :, past_len + j] = cache[b, :, past_len + node]
    return None


# --------------------------------------------------------------------------------------------
# engine-step ops: compositions of the ops above
# --------------------------------------------------------------------------------------------
def sage_level_(tokens, parents, logprobs, cum_logprobs, tree_mask, logits, alpha, frontier_start, level,
                slot_start, num_slots, k, temperature, d_min, d_max, w_min, w_max, theta_scale=0.1):
    """One SAGE level in place: topk_confidence, sage_tree, expand_tree, then the new slots' tree-mask rows.

    logits [B, F, V] belong to the frontier slots [frontier_start, frontier_start + F). The tree is shaped
    by alpha [B], or (alpha None, zero-lag) by each row's first frontier node's confidence. Tree-mask row
    i of a new slot (slot_start <= i < slot_start + num_slots) = row parents[b, i] with column i opened
    (0); a padding slot: finfo.min everywhere but column i. Returns (count [B], frontier_alpha [B, F],
    max_depth [B]).
    """
    batch, num_frontier, vocab = logits.shape
    frontier_alpha, topk_lp, topk_ids = topk_confidence(logits.reshape(batch * num_frontier, vocab), k, temperature)
    frontier_alpha = frontier_alpha.reshape(batch, num_frontier)
    shape_alpha = alpha if alpha is not None else frontier_alpha[:, 0]
    frontier_slots = slice(frontier_start, frontier_start + num_frontier)
    widths, min_cum, max_depth = sage_tree(shape_alpha, logprobs[:, frontier_slots], level, k, d_min, d_max,
                                           w_min, w_max, theta_scale)
    frontier = torch.arange(frontier_start, frontier_start + num_frontier, device=tokens.device).expand(batch, -1)
    count = expand_tree(tokens, parents, logprobs, cum_logprobs, frontier, topk_lp.reshape(batch, num_frontier, k),
                        topk_ids.reshape(batch, num_frontier, k), widths, min_cum, slot_start, num_slots)
    if tree_mask is not None:
        blocked = torch.finfo(tree_mask.dtype).min
        for b in range(batch):
            for i in range(slot_start, slot_start + num_slots):
                parent = int(parents[b, i])
                if parent >= 0:
                    tree_mask[b, i] = tree_mask[b, parent]
                else:
                    tree_mask[b, i] = blocked
                tree_mask[b, i, i] = 0
    return count, frontier_alpha, max_depth


def expand_level_(tokens, parents, logprobs, cum_logprobs, logits, frontier_start, k, temperature, slot_start,
                  num_slots):
    """One EAGLE-2 level in place: topk_confidence of the frontier's logits [B, F, V] (the slots [frontier_start,
    frontier_start + F)), then expand_tree with every frontier slot allowed k children and no threshold.
    Returns (count [B], frontier_alpha [B, F])."""
    batch, num_frontier, vocab = logits.shape
    alpha, topk_lp, topk_ids = topk_confidence(logits.reshape(batch * num_frontier, vocab), k, temperature)
    frontier = torch.arange(frontier_start, frontier_start + num_frontier, device=tokens.device).expand(batch, -1)
    widths = torch.full((batch, num_frontier), k, dtype=torch.int64, device=tokens.device)
    no_threshold = torch.full((batch,), -math.inf, dtype=torch.float32, device=tokens.device)
    count = expand_tree(tokens, parents, logprobs, cum_logprobs, frontier, topk_lp.reshape(batch, num_frontier, k),
                        topk_ids.reshape(batch, num_frontier, k), widths, no_threshold, slot_start, num_slots)
    return count, alpha.reshape(batch, num_frontier)


def gather_level_(tokens, logprobs, logits, child_index, slot_start, k, temperature):
    """One level of a fixed tree in place: topk_confidence of the frontier's logits [B, F, V]; slot
    slot_start + c of every row gets the token and log-prob at child_index[c] of that row's flattened [F * k]
    top-k. Returns frontier_alpha [B, F]."""
    batch, num_frontier, vocab = logits.shape
    if ((child_index < 0) | (child_index >= num_frontier * k)).any():
        raise ValueError(f"child_index entries must be in [0, F * k) = [0, {num_frontier * k})")
    alpha, topk_lp, topk_ids = topk_confidence(logits.reshape(batch * num_frontier, vocab), k, temperature)
    for b in range(batch):
        flat_ids = topk_ids.reshape(batch, num_frontier * k)[b]
        flat_lp = topk_lp.reshape(batch, num_frontier * k)[b]
        for c, index in enumerate(child_index.tolist()):
            tokens[b, slot_start + c] = flat_ids[index]
            logprobs[b, slot_start + c] = flat_lp[index]
    return alpha.reshape(batch, num_frontier)


def rerank_select(tokens, parents, logprobs, cum_logprobs, node_row, num_select):
    """EAGLE-2's final selection as a new tree: rerank_tree, then the kept nodes' tokens, parents (positions in
    the selection), log-probs and node_row entries; a padding position (fewer real nodes than num_select) gets
    token 0, parent -1, log-prob -inf and row -1. The rows get one more entry, -1.
    Returns (tokens [B, S], parents [B, S], logprobs [B, S], node_row [B, S + 1])."""
    keep, new_parents = rerank_tree(parents, cum_logprobs, num_select)
    batch = tokens.shape[0]
    kept_tokens = torch.zeros((batch, num_select), dtype=torch.int64, device=tokens.device)
    kept_logprobs = torch.full((batch, num_select), -math.inf, dtype=torch.float32, device=tokens.device)
    kept_rows = torch.full((batch, num_select + 1), -1, dtype=torch.int64, device=tokens.device)
    for b in range(batch):
        for j, slot in enumerate(keep[b].tolist()):
            if slot >= 0:
                kept_tokens[b, j] = tokens[b, slot]
                kept_logprobs[b, j] = logprobs[b, slot]
                kept_rows[b, j] = max(int(node_row[b, slot]), -1)
    return kept_tokens, new_parents, kept_logprobs, kept_rows


def tree_mask_feed_(tree_mask, parents, node_row, slot_start, first_row, count):
    """The draft tree-mask rows of a feed, in place: row first_row + j (for slot slot_start + j) = the row of the
    slot's parent with column first_row + j set to 0. The parent's row is node_row[b, parent] (node_row None: the
    parent index itself); a padding parent (-1), or a row that is not before first_row, gives the last row of
    tree_mask (the all-blocked padding row). Returns None."""
    batch, rows, _ = tree_mask.shape
    padding_row = rows - 1
    for b in range(batch):
        for j in range(count):
            parent = int(parents[b, slot_start + j])
            parent_row = parent if node_row is None or parent < 0 else int(node_row[b, parent])
            if parent < 0 or parent_row < 0 or parent_row >= first_row:
                parent_row = padding_row
            row = first_row + j
            tree_mask[b, row] = tree_mask[b, parent_row]
            tree_mask[b, row, row] = 0
    return None


def commit_tree_(tokens, parents, accepted, accept_len, bonus, sequence, seq_start, target_caches, target_past,
                 draft_caches, draft_rows, draft_past, alpha):
    """Commit a verified tree: new tokens into `sequence`, both KV caches compacted, the host readback.

    New tokens = tokens of the accepted path after the root, then the bonus; they go to
    sequence[b, seq_start : seq_start + accept_len + 1]. target_caches: kv_compact_ with `accepted` at
    target_past. The draft holds the accepted nodes whose draft_rows entry is >= 0 (a prefix of the
    path); draft_caches: kv_compact_ with those rows at draft_past. Returns readback [B, 4 + N] int64:
    accept_len, accepted nodes the draft holds, real (non-padding) nodes besides the root, the int32
    bits of alpha (0 when None), then the new tokens (-1 after them).
    """
    batch, num_nodes = tokens.shape
    readback = torch.full((batch, 4 + num_nodes), -1, dtype=torch.int64, device=tokens.device)
    draft_accepted = torch.full_like(accepted, -1)
    for b in range(batch):
        tau = int(accept_len[b])
        path = accepted[b, : tau + 1].tolist()
        new_tokens = [int(tokens[b, node]) for node in path[1:]] + [int(bonus[b])]
        sequence[b, seq_start : seq_start + tau + 1] = torch.tensor(new_tokens, dtype=torch.int64)
        held = 0
        if draft_rows is not None:
            for j, node in enumerate(path):
                row = int(draft_rows[b, node])
                if row < 0:
                    break
                draft_accepted[b, j] = row
                held += 1
        real = int((parents[b, 1:] >= 0).sum())
        bits = int(alpha[b].view(torch.int32)) if alpha is not None else 0
        readback[b, :4] = torch.tensor([tau, held, real, bits])
        readback[b, 4 : 4 + tau + 1] = torch.tensor(new_tokens)
    kv_compact_(target_caches, accepted, target_past)
    kv_compact_(draft_caches, draft_accepted, draft_past)
    return readback
