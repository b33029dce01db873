"""Speculative decoding of an image + prompt with sage_ext's high-level API, on the bundled model pair.

Run: python examples/generate_image.py [IMAGE_FILE]  (default: a held-out scene of the pair's task)
"""
import sys

from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import sage_ext
from sage_ext.fixtures import DRAFT_DIR, TARGET_DIR, scenes

# The bundled pair (a 5.6M-parameter LLaVA target and its 0.72M draft); any same-family pair loads the same way.
processor = AutoProcessor.from_pretrained(TARGET_DIR)
target = AutoModelForImageTextToText.from_pretrained(TARGET_DIR, attn_implementation="sdpa").eval()
draft = AutoModelForImageTextToText.from_pretrained(DRAFT_DIR, attn_implementation="sdpa").eval()

image = Image.open(sys.argv[1]).convert("RGB") if len(sys.argv) > 1 else scenes.heldout_scenes(1)[0].render()
inputs = processor(text="<image>\nDescribe the image in detail.\n", images=image, return_tensors="pt")

# One call: the target's greedy output, token for token, from fewer target forwards (SAGE trees).
sequences, stats = sage_ext.generate(target, draft, policy="sage", **inputs, max_new_tokens=96)
text = processor.decode(sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
print(text)
print(f"{stats.new_tokens} tokens from {stats.target_forwards} target forwards "
      f"(tau {stats.mean_tau:.2f} accepted draft tokens per step), {stats.tokens_per_second:.0f} tokens/s")

# Streaming: the same decoding, printed as each step's accepted tokens arrive.
for piece in sage_ext.stream(target, draft, policy="sage", tokenizer=processor, **inputs, max_new_tokens=96):
    print(piece, end="", flush=True)
print()
