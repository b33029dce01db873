"""`sage-ext generate`: one image and prompt through the speculative engine, streamed (or printed at the end,
or as one JSON object), with the run's stats on stderr and, with --stats-json, in a file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from . import models
from .runs import CONVENTION, run_engine
from .validation import parse_policy


def cmd_generate(args) -> int:
    from PIL import Image
    from transformers import TextStreamer

    from ..engine import SpeculativeGenerator

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device_obj
    policy = parse_policy(args.policy, args.policy_args)
    with Image.open(args.image) as opened:
        image = opened.convert("RGB")
    target, draft, processor = models.load_pair(args.target, args.draft, device, models.pick_dtype(args.dtype, device),
                                                args.device_map)
    tokenizer = models.tokenizer_of(processor)
    inputs = models.build_inputs(processor, image, models.format_prompt(processor, args.prompt), device, target.dtype)
    engine = SpeculativeGenerator(target, draft, policy, draft_prune_ratio=args.draft_prune_ratio,
                                  capture_draft=args.capture_draft, sampling_rule=args.sampling_rule)
    stream = not (args.no_stream or args.json)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    sample = args.temperature > 0
    generator = None
    if sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(args.seed)
    run = run_engine(engine, inputs, args.max_new_tokens, device, do_sample=sample,
                     temperature=args.temperature if sample else 1.0, top_k=args.top_k, top_p=args.top_p,
                     repetition_penalty=args.repetition_penalty, streamer=streamer, generator=generator,
                     tokenizer=tokenizer)  # for stop strings a generation config may set
    text = tokenizer.decode(run["ids"], skip_special_tokens=True)
    stats = run["stats"]
    if args.json:
        print(json.dumps({"text": text, "new_token_ids": run["ids"], "policy": policy.describe(),
                          "seconds": run["seconds"], "tokens_per_second": len(run["ids"]) / run["seconds"],
                          "stats": stats.to_dict()}, indent=1))
    elif args.no_stream:
        print(text)
    if not getattr(args, "quiet", False):
        print(f"[{policy.name}] {len(run['ids'])} tokens in {run['seconds']:.2f}s ({len(run['ids']) / run['seconds']:.1f} tok/s); "
              f"tau {stats.mean_tau:.2f}, {stats.tokens_per_target_forward:.2f} tokens per target forward over "
              f"{stats.target_forwards} steps ({CONVENTION})", file=sys.stderr)
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(stats.to_dict(), indent=1) + "\n")
    return 0
