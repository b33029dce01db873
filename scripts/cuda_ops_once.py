"""Call every sage_ext op once at realistic sizes, for compute-sanitizer (memcheck, racecheck) on the GPU.

Sizes: batch 1, a tree of N=64 nodes (+ root), vocabulary V=152064 (Qwen2-VL's), KV caches of 8 tensors
[1, 4, 1024 + N, 128]; every op that takes floating data is run in bfloat16 and in float32. Then (unless
--only ops) a short speculative generation with tiny random Llama models (static tree and SAGE), which runs
the TreeWorkspace's device paths. Each call is followed by a device synchronize, so an error is reported at the
op that caused it. Prints one line per call and, at the end, a JSON line {"calls": n, "seconds": s}.

    compute-sanitizer --tool memcheck python scripts/cuda_ops_once.py
    python scripts/cuda_ops_once.py --device cpu      # the same calls on the CPU kernels (a dry run)
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from sage_ext import ops

BATCH, NODES, VOCAB, TOP_K, PAST = 1, 64, 152064, 10, 1024
SAGE = dict(d_min=3.0, d_max=8.0, w_min=2.0, w_max=10.0)


class Caller:
    def __init__(self, device: torch.device):
        self.device = device
        self.count = 0

    def __call__(self, name: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.count += 1
        print(f"{name:<40} {1e3 * (time.perf_counter() - start):9.2f} ms", flush=True)
        return out


def bushy_parents(nodes: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    row = [-1] + [rng.randrange(max(0, i - 6), i) for i in range(1, nodes)]
    return torch.tensor([row], dtype=torch.int64)


def run_ops(call: Caller, dtype: torch.dtype) -> None:
    dev = call.device
    tag = str(dtype).replace("torch.", "")
    gen = torch.Generator().manual_seed(0)
    n = NODES + 1  # root + 64 nodes

    logits = (torch.randn(NODES, VOCAB, generator=gen) * 3).to(dtype).to(dev)
    alpha, topk_lp, topk_ids = call(f"topk_confidence[{tag}]", ops.topk_confidence, logits, TOP_K, 0.8)
    call("build_static_tree", ops.build_static_tree, ops.paths_to_tensor(ops.SPECVLM_TREE_PATHS, dev))
    frontier_lp = torch.log(torch.rand(BATCH, 16, generator=gen)).to(dev)
    widths, min_cum, _ = call("sage_tree", ops.sage_tree, alpha[:BATCH].contiguous(), frontier_lp, 2, TOP_K,
                              *SAGE.values())

    # expand_tree: 16 frontier nodes in slots [1, 17) proposing their top-10 into slots [17, 65)
    tokens = torch.zeros(BATCH, n, dtype=torch.int64, device=dev)
    parents = torch.full((BATCH, n), -1, dtype=torch.int64, device=dev)
    parents[:, 1:17] = 0
    logprobs = torch.zeros(BATCH, n, device=dev)
    cum = torch.zeros(BATCH, n, device=dev)
    logprobs[:, 1:17] = cum[:, 1:17] = frontier_lp
    frontier = torch.arange(1, 17, device=dev)[None]
    call("expand_tree", ops.expand_tree, tokens, parents, logprobs, cum, frontier,
         topk_lp[None, :16].contiguous(), topk_ids[None, :16].contiguous(), widths, min_cum, 17, n - 17)
    call("rerank_tree", ops.rerank_tree, bushy_parents(n, 1).to(dev),
         -torch.rand(BATCH, n, generator=gen).mul(6).to(dev), 32)

    parents = bushy_parents(n, 2).to(dev)
    tokens = torch.randint(0, VOCAB, (BATCH, n), generator=gen).to(dev)
    call(f"tree_buffers[{tag}]", ops.tree_buffers, parents, PAST, dtype)
    target_logits = torch.randn(BATCH, n, VOCAB, generator=gen)
    # make the target follow the tree for a few levels, so verification walks and the commit moves rows
    host_parents = parents.cpu()[0].tolist()
    node = 0
    for _ in range(5):
        kids = [i for i, p in enumerate(host_parents) if p == node]
        if not kids:
            break
        target_logits[0, node, int(tokens[0, kids[0]])] = 30.0
        node = kids[0]
    target_logits = target_logits.to(dtype).to(dev)
    call("verify_greedy[argmax]", ops.verify_greedy, tokens, parents, target_logits.argmax(-1))
    accepted, accept_len, bonus = call(f"verify_greedy[logits,{tag}]", ops.verify_greedy, tokens, parents,
                                       target_logits)
    probs = torch.softmax(target_logits.float(), -1).to(dtype)
    rng = torch.Generator(dev).manual_seed(0)
    call(f"verify_sampling[q=1,{tag}]", ops.verify_sampling, tokens, parents, probs, None, rng)
    call(f"verify_sampling[q,{tag}]", ops.verify_sampling, tokens, parents, probs, probs.roll(1, -1).contiguous(),
         rng)
    cpu_rng = torch.Generator().manual_seed(0)
    call(f"verify_sampling[cpu generator,{tag}]", ops.verify_sampling, tokens, parents, probs, None, cpu_rng)
    call(f"verify_traversal[q=1,{tag}]", ops.verify_traversal, tokens, parents, probs, None, rng)
    call(f"verify_traversal[q,{tag}]", ops.verify_traversal, tokens, parents, probs, probs.roll(1, -1).contiguous(),
         rng)

    caches = [torch.randn(BATCH, 4, PAST + n, 128, generator=gen).to(dtype).to(dev) for _ in range(8)]
    call(f"kv_compact_[{tag}]", ops.kv_compact_, caches, accepted, PAST)

    # sage_level_: level 2 from a 16-node frontier in slots [1, 17) into [17, 65), with the tree mask
    tokens2 = torch.zeros(BATCH, n, dtype=torch.int64, device=dev)
    parents2 = torch.full((BATCH, n), -1, dtype=torch.int64, device=dev)
    parents2[:, 1:17] = 0
    logprobs2 = torch.zeros(BATCH, n, device=dev)
    cum2 = torch.zeros(BATCH, n, device=dev)
    logprobs2[:, 1:17] = cum2[:, 1:17] = frontier_lp
    mask = torch.full((BATCH, n + 1, n), torch.finfo(dtype).min, dtype=dtype, device=dev)
    mask[:, 0, 0] = 0
    mask[:, 1:17, 0] = 0
    mask[:, torch.arange(1, 17), torch.arange(1, 17)] = 0
    level_logits = logits[None, :16].contiguous()
    call(f"sage_level_[lagged,{tag}]", ops.sage_level_, tokens2, parents2, logprobs2, cum2, mask, level_logits,
         alpha[:BATCH].contiguous(), 1, 2, 17, n - 17, TOP_K, 0.8, *SAGE.values())
    call(f"sage_level_[zero-lag,no mask,{tag}]", ops.sage_level_, tokens2.clone(), parents2.clone(),
         logprobs2.clone(), cum2.clone(), None, level_logits, None, 1, 2, 17, n - 17, TOP_K, 0.8, *SAGE.values())

    # the other level ops of the engine's workspace: an EAGLE-2 level, a fixed-tree level, the final selection,
    # the mask rows of a feed
    call(f"expand_level_[{tag}]", ops.expand_level_, tokens2.clone(), parents2.clone(), logprobs2.clone(),
         cum2.clone(), level_logits, 1, TOP_K, 0.8, 17, n - 17)
    call(f"gather_level_[{tag}]", ops.gather_level_, tokens2.clone(), logprobs2.clone(), level_logits,
         torch.arange(0, 16 * TOP_K, 5, device=dev), 17, TOP_K, 1.0)
    call(f"rerank_select[{tag}]", ops.rerank_select, tokens, parents, logprobs2, cum2,
         torch.arange(n + 1, device=dev).expand(BATCH, -1).contiguous(), 40)
    call(f"tree_mask_feed_[{tag}]", ops.tree_mask_feed_, mask, parents2, None, 17, 17, 16)

    depth = ops.tree_buffers(parents, 0)[0]
    fed = (depth < 3) & ((parents >= 0) | (torch.arange(n, device=dev) == 0))
    draft_rows = torch.where(fed, fed.long().cumsum(1) - 1, -1)
    draft_caches = [torch.randn(BATCH, 2, 512 + n, 64, generator=gen).to(dtype).to(dev) for _ in range(4)]
    sequence = torch.zeros(BATCH, 2048, dtype=torch.int64, device=dev)
    readback = call(f"commit_tree_[{tag}]", ops.commit_tree_, tokens, parents, accepted, accept_len, bonus,
                    sequence, 900, caches, PAST, draft_caches, draft_rows, 512,
                    torch.rand(BATCH, generator=gen).to(dev))
    assert int(readback[0, 0]) >= 1, "the planted target path should accept at least one node"


def run_engine(call: Caller) -> None:
    """A short generation with tiny random Llama models: the TreeWorkspace's device paths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sage_ext.engine import SpeculativeGenerator
    from sage_ext.engine.policies import SagePolicy, StaticTreePolicy

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=511, bos_token_id=1, pad_token_id=None, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    target = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # well-separated argmaxes
        target.lm_head.weight.normal_(0, 2.0)
    draft = LlamaForCausalLM(config).eval()
    draft.load_state_dict(target.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    target, draft = target.to(call.device), draft.to(call.device)
    prompt = torch.randint(2, 500, (1, 16), generator=torch.Generator().manual_seed(1)).to(call.device)
    policies = (("static", StaticTreePolicy()), ("sage", SagePolicy()), ("sage zero-lag", SagePolicy(lag=False)))
    for name, policy in policies:
        engine = SpeculativeGenerator(target, draft, policy)
        call(f"engine generate [{name}]", lambda e=engine: e.generate(input_ids=prompt, max_new_tokens=8))
    engine = SpeculativeGenerator(target, draft, SagePolicy())
    call("engine generate [sage, sampling]", lambda: engine.generate(
        input_ids=prompt, max_new_tokens=8, do_sample=True, generator=torch.Generator(call.device).manual_seed(0)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--only", choices=["ops", "engine"], default=None,
                        help="only the op calls, or only the tiny-model generation (default: both)")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated floating dtypes")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and ops.cuda_available()):
        print("cuda_ops_once: needs a GPU and sage_ext built with its CUDA kernels", file=sys.stderr)
        return 2
    start = time.perf_counter()
    call = Caller(device)
    if args.only != "engine":
        with torch.inference_mode():
            for name in args.dtypes.split(","):
                run_ops(call, getattr(torch, name.strip()))
    if args.only != "ops":
        run_engine(call)
    print(json.dumps({"calls": call.count, "seconds": round(time.perf_counter() - start, 2), "device": str(device)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
