"""Using sage_ext's ops inside your own decoding loop (the README's example, run by the tests).

Greedy speculative decoding with the simplest tree: the root (last committed token) and the
draft's top-k guesses for the next token as its children. The target checks all guesses in one
forward; output is token-identical to `target.generate(do_sample=False)`.
"""
import torch
from transformers import DynamicCache

from sage_ext import ops


@torch.inference_mode()
def speculative_greedy(target, draft, input_ids, max_new_tokens, k=4):
    t_cache, d_cache = DynamicCache(), DynamicCache()
    target(input_ids=input_ids[:, :-1], cache=t_cache)              # the root stays out of the caches
    draft(input_ids=input_ids[:, :-1], cache=d_cache)
    out, draft_todo = input_ids, input_ids[:, -1:]                    # draft_todo: tokens the draft has not seen
    parents = torch.tensor([[-1] + [0] * k])                          # root + k children
    while out.shape[1] - input_ids.shape[1] < max_new_tokens:
        root = out[:, -1:]
        d_logits = draft(input_ids=draft_todo, cache=d_cache).logits[:, -1]
        alpha, _, guesses = ops.topk_confidence(d_logits, k)        # draft confidence + its top-k
        tokens = torch.cat([root, guesses], dim=1)                    # [1, k + 1]
        past = t_cache.get_seq_length()
        _, positions, *_, mask, _ = ops.tree_buffers(parents, past, torch.float32)
        logits = target(input_ids=tokens, attention_mask=mask, position_ids=positions,
                        cache=t_cache).logits                         # one forward over the tree
        accepted, accept_len, bonus = ops.verify_greedy(tokens, parents, logits)
        ops.kv_compact_([t for layer in t_cache.layers for t in (layer.keys, layer.values)], accepted, past)
        n = int(accept_len)                                           # the step's one host sync
        t_cache.crop(past + n + 1 - t_cache.get_seq_length())         # v5 crop takes a negative count
        new = torch.cat([tokens[:, accepted[0, 1:n + 1]], bonus[:, None]], dim=1)
        draft_todo = new
        out = torch.cat([out, new], dim=1)
    return out[:, : input_ids.shape[1] + max_new_tokens]
