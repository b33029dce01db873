"""Train the bundled fixture VLM pair (target + draft) from scratch on the procedural scene task.

    python benchmarks/train_fixture.py                    # small pair -> sage_ext/fixtures/{target,draft}
    python benchmarks/train_fixture.py --size large --out-dir /tmp/fixtures_large   # bigger pair, for a GPU

What it does, deterministically (fixed seeds, fixed data order, fixed thread count):
1. builds a byte-level BPE tokenizer with the `tokenizers` library on text of the task (captions,
   questions, answers) and wraps it in `PreTrainedTokenizerFast`;
2. builds a `LlavaProcessor` (CLIPImageProcessorPil: works without torchvision) around it;
3. trains two `LlavaForConditionalGeneration` models (tiny CLIP vision tower + Llama decoder) on
   scenes from `sage_ext.fixtures.scenes`: the target, and a draft about 8x smaller sharing the
   tokenizer and processor; loss on the answer tokens only;
4. measures on held-out scenes: greedy caption attribute accuracy of both models, and greedy token
   agreement of the draft with the target (teacher-forced on the target's own greedy captions);
5. saves each model (safetensors, float16 weights, config dtype float32 so `from_pretrained` loads
   float32), the processor and tokenizer, and a README.md model card holding the measured numbers.

`--size large` is the same code path with larger models, larger batches and more steps; it is meant
for a GPU machine (about 5 minutes there) and was not run on the 2-core CPU machine.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sage_ext.fixtures import scenes  # noqa: E402

# Model and schedule sizes. "params" in comments are approximate totals (vision + projector + text).
SIZES = {
    "small": {  # ~5.6M target, ~0.72M draft (7.8x smaller)
        "target": {"vision_hidden": 192, "vision_layers": 2, "vision_heads": 4,
                   "text_hidden": 256, "text_layers": 6, "text_heads": 8, "text_intermediate": 640,
                   "steps": 1000, "batch": 32, "lr": 8e-4},
        "draft": {"vision_hidden": 96, "vision_layers": 1, "vision_heads": 2,
                  "text_hidden": 128, "text_layers": 2, "text_heads": 4, "text_intermediate": 384,
                  "steps": 600, "batch": 32, "lr": 1e-3},
    },
    "large": {  # ~31.6M target
        "target": {"vision_hidden": 384, "vision_layers": 4, "vision_heads": 6,
                   "text_hidden": 512, "text_layers": 8, "text_heads": 8, "text_intermediate": 1408,
                   "steps": 3000, "batch": 64, "lr": 5e-4},
        "draft": {"vision_hidden": 192, "vision_layers": 1, "vision_heads": 4,  # ~4.6M, 6.9x smaller
                  "text_hidden": 320, "text_layers": 3, "text_heads": 5, "text_intermediate": 864,
                  "steps": 1500, "batch": 64, "lr": 1e-3},
    },
}
CAPTION_FRACTION = 0.7  # the rest of the training examples are question/answer pairs
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", IMAGE_TOKEN]


# ---------------------------------------------------------------------------------------------
# tokenizer and processor
# ---------------------------------------------------------------------------------------------
def task_text_corpus(num_scenes: int = 3000) -> list[str]:
    """Text the tokenizer is trained on: prompts, captions and Q/A pairs of training scenes."""
    lines = []
    for scene in scenes.training_scenes(num_scenes):
        lines.append(scenes.caption_prompt("") + scene.caption())
        for question, answer in scene.qa_pairs(num=5):
            lines.append(scenes.question_prompt(question, "") + " " + answer)
    return lines


def build_tokenizer(vocab_size: int = 640):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(task_text_corpus(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": IMAGE_TOKEN}, model_max_length=512)


def build_processor(tokenizer):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": scenes.IMAGE_SIZE}, crop_size={"height": scenes.IMAGE_SIZE, "width": scenes.IMAGE_SIZE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=scenes.CELL,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def build_model(spec: dict, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=spec["vision_hidden"], intermediate_size=spec["vision_hidden"] * 2,
        num_hidden_layers=spec["vision_layers"], num_attention_heads=spec["vision_heads"],
        image_size=scenes.IMAGE_SIZE, patch_size=scenes.CELL, projection_dim=spec["vision_hidden"])
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec["text_hidden"], intermediate_size=spec["text_intermediate"],
        num_hidden_layers=spec["text_layers"], num_attention_heads=spec["text_heads"],
        num_key_value_heads=spec["text_heads"], max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=scenes.GRID * scenes.GRID, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def freeze_vision(model) -> None:
    """Keep the vision tower and projector at their seeded random initialization.

    Measured on this task (linear probe of the shape kind from each image token): random CLIP features
    after the projector separate the kinds ~90%; training tower + projector jointly with the decoder in
    the CPU budget collapsed that to ~48% (colour and size directions grow and drown the kind), and the
    decoder then never learned kinds. With frozen random features the decoder learns all attributes.
    """
    for module in (model.model.vision_tower, model.model.multi_modal_projector):
        for param in module.parameters():
            param.requires_grad_(False)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
class ExampleEncoder:
    """Turns (scene, prompt, answer) into input ids / labels / pixel values, exactly as the processor
    would tokenize the prompt at inference time (the answer continues the prompt's ids)."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_tokens = IMAGE_TOKEN * (scenes.GRID * scenes.GRID)
        self._prompt_cache: dict[str, list[int]] = {}

    def prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = self.tokenizer(prompt.replace(IMAGE_TOKEN, self.image_tokens))["input_ids"]
        return self._prompt_cache[prompt]

    def encode(self, prompt: str, answer: str) -> tuple[list[int], int]:
        prompt_ids = self.prompt_ids(prompt)
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        return prompt_ids + answer_ids + [self.tokenizer.eos_token_id], len(prompt_ids)

    def pixel_values(self, images) -> torch.Tensor:
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"]

    def batch(self, examples: list[tuple[scenes.Scene, str, str]]) -> dict:
        encoded = [self.encode(prompt, answer) for _, prompt, answer in examples]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (ids, prompt_len) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, prompt_len: len(ids)] = torch.tensor(ids[prompt_len:])
            attention_mask[row, : len(ids)] = 1
        pixel_values = self.pixel_values([scene.render() for scene, _, _ in examples])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixel_values}


def training_examples(step: int, batch: int, data_seed: int) -> list[tuple[scenes.Scene, str, str]]:
    """Examples of one step: fresh scenes (seed = position in the stream), caption or one Q/A pair."""
    rng = random.Random(data_seed * 1_000_003 + step)
    out = []
    for i in range(batch):
        scene = scenes.generate_scene((step * batch + i) % scenes.HELDOUT_SEED_BASE)
        if rng.random() < CAPTION_FRACTION:
            out.append((scene, scenes.caption_prompt(IMAGE_TOKEN), scene.caption()))
        else:
            question, answer = scene.qa_pairs(rng, num=1)[0]
            out.append((scene, scenes.question_prompt(question, IMAGE_TOKEN), answer))
    return out


# ---------------------------------------------------------------------------------------------
# training and evaluation
# ---------------------------------------------------------------------------------------------
def train(model, encoder: ExampleEncoder, spec: dict, device: torch.device, data_seed: int, name: str,
          log_every: int = 50, bf16: bool = False, probe: "AttributeProbe | None" = None) -> dict:
    model.to(device).train()
    if not spec.get("train_vision", False):
        freeze_vision(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=spec["lr"], betas=(0.9, 0.98), eps=1e-8)
    steps = spec["steps"]
    scheduler = warmup_cosine_schedule(optimizer, steps)
    # bf16 autocast is ~10% faster on CPU but learns worse at these learning rates: off by default.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    caption_prompt = scenes.caption_prompt(IMAGE_TOKEN)
    start, losses = time.time(), []
    for step in range(steps):
        examples = training_examples(step, spec["batch"], data_seed)
        # Captions and (short) Q/A examples go in separate micro-batches: far less padding.
        groups = [[e for e in examples if e[1] == caption_prompt], [e for e in examples if e[1] != caption_prompt]]
        batches = [encoder.batch(group) for group in groups if group]
        total_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        loss_sum = 0.0
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            token_loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum")
            (token_loss / total_tokens).backward()
            loss_sum += token_loss.item()
        loss = torch.tensor(loss_sum / total_tokens)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            extra = f" held-out attribute-token accuracy {probe(model):.3f}" if probe and (step + 1) % (4 * log_every) == 0 else ""
            print(f"[{name}] step {step + 1}/{steps} loss {recent:.4f}{extra} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    return {"steps": steps, "batch": spec["batch"], "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "train_seconds": round(time.time() - start, 1)}


def warmup_cosine_schedule(optimizer, steps: int):
    """Linear warmup over the first 5% of `steps`, then cosine decay to 5% of the learning rate."""
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def card_results(metrics: dict, explanation: list[str], train_info: dict, sizes: dict) -> list[str]:
    """The model card's measured-metrics table, what its main metric means, and the training record."""
    lines = ["## Measured on held-out scenes (greedy decoding)", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in metrics.items()]
    lines += ["", *explanation,
              "", "## Training", "", "```json", json.dumps({"train": train_info, "sizes": sizes}, indent=2), "```", ""]
    return lines


class AttributeProbe:
    """Teacher-forced accuracy on the attribute words (size, colour, kind) of held-out captions: a cheap
    progress signal printed during training (the real quality bar is measured on greedy captions)."""

    def __init__(self, encoder: ExampleEncoder, device: torch.device, count: int = 32):
        tokenizer = encoder.tokenizer
        words = list(scenes.SIZES) + list(scenes.COLORS) + list(scenes.SHAPES)
        attribute_ids = {tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words}
        held = scenes.heldout_scenes(count, start=50_000)
        self.batch = {k: v.to(device) for k, v in encoder.batch(
            [(s, scenes.caption_prompt(IMAGE_TOKEN), s.caption()) for s in held]).items()}
        labels = self.batch["labels"][:, 1:]
        self.select = torch.isin(labels, torch.tensor(sorted(attribute_ids), device=device))
        self.targets = labels[self.select]

    @torch.no_grad()
    def __call__(self, model) -> float:
        was_training = model.training
        model.eval()
        logits = model(**{k: v for k, v in self.batch.items() if k != "labels"}).logits[:, :-1]
        model.train(was_training)
        return (logits[self.select].argmax(-1) == self.targets).float().mean().item()


@torch.no_grad()
def greedy_captions(model, encoder: ExampleEncoder, eval_scenes: list[scenes.Scene], device: torch.device,
                    max_new_tokens: int = 96, chunk: int = 50) -> tuple[list[str], list[list[int]]]:
    """Greedy captions (batched: every caption prompt has the same length, so no padding)."""
    tokenizer = encoder.tokenizer
    prompt = encoder.prompt_ids(scenes.caption_prompt(IMAGE_TOKEN))
    texts, new_ids = [], []
    for i in range(0, len(eval_scenes), chunk):
        part = eval_scenes[i: i + chunk]
        input_ids = torch.tensor([prompt] * len(part), device=device)
        pixel_values = encoder.pixel_values([s.render() for s in part]).to(device)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                             max_new_tokens=max_new_tokens, do_sample=False)
        for row in out[:, input_ids.shape[1]:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            row = [t for t in row if t != tokenizer.pad_token_id]
            new_ids.append(row)
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts, new_ids


def caption_accuracy(eval_scenes, texts) -> dict:
    scores = [scenes.score_caption(s, t) for s, t in zip(eval_scenes, texts)]
    correct, total = sum(s["correct"] for s in scores), sum(s["total"] for s in scores)
    return {"attribute_accuracy": round(correct / total, 4), "attributes": total,
            "exact_caption_rate": round(sum(s["exact"] for s in scores) / len(scores), 4),
            "hallucinated_objects_per_scene": round(sum(s["hallucinated"] for s in scores) / len(scores), 4)}


@torch.no_grad()
def qa_accuracy(model, encoder: ExampleEncoder, eval_scenes, device: torch.device) -> float:
    """Exact-match accuracy of greedy answers to one question per held-out scene."""
    correct = 0
    for scene in eval_scenes:
        question, answer = scene.qa_pairs(random.Random(scene.seed), num=1)[0]
        ids = torch.tensor([encoder.prompt_ids(scenes.question_prompt(question, IMAGE_TOKEN))], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=encoder.pixel_values([scene.render()]).to(device), max_new_tokens=24, do_sample=False)
        said = encoder.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        correct += said == answer
    return round(correct / len(eval_scenes), 4)


@torch.no_grad()
def greedy_agreement(target_ids: list[list[int]], draft, encoder: ExampleEncoder, eval_scenes, device) -> float:
    """Fraction of the target's greedy caption tokens that the draft's argmax predicts, given the
    target's own prefix (= acceptance rate of a one-token chain draft under greedy verification)."""
    prompt = encoder.prompt_ids(scenes.caption_prompt(IMAGE_TOKEN))
    agree = total = 0
    for scene, ids in zip(eval_scenes, target_ids):
        seq = torch.tensor([prompt + ids], device=device)
        logits = draft(input_ids=seq, pixel_values=encoder.pixel_values([scene.render()]).to(device)).logits
        predicted = logits[0, len(prompt) - 1: seq.shape[1] - 1].argmax(-1)
        agree += (predicted == seq[0, len(prompt):]).sum().item()
        total += len(ids)
    return round(agree / total, 4)


def save_pair_member(model, processor, out: Path, card: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    model.half().save_pretrained(out, safe_serialization=True)
    # Weights are stored in float16 (size); the config asks from_pretrained for float32 compute.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    for section in (config, config.get("text_config", {}), config.get("vision_config", {})):
        if "dtype" in section:
            section["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.float()
    processor.save_pretrained(out)
    (out / "README.md").write_text(card)


def model_card(role: str, size: str, params: int, train_info: dict, metrics: dict, config: dict) -> str:
    lines = [
        f"# sage_ext fixture {role} ({size})",
        "",
        f"A `LlavaForConditionalGeneration` (CLIP vision tower + Llama decoder, {params / 1e6:.2f}M parameters) trained",
        "from scratch by `benchmarks/train_fixture.py` on the procedural grid-scene task of",
        "`sage_ext.fixtures.scenes` (64x64 images, a 4x4 grid of 16x16 cells = vision patches, 2-6 coloured",
        "shapes). It exists so that the speculative engine, CLI and benchmarks run offline on a real",
        "trained draft/target pair. Not a general model.",
        "",
        "Prompt format (no chat template): `<image>\\nDescribe the image in detail.\\n` or",
        "`<image>\\nQuestion: ... Answer:\\n`; the processor expands `<image>` to 16 image tokens.",
        "Weights are stored in float16; the config loads them as float32.",
        "The vision tower and projector keep their seeded random initialization (frozen random features);",
        "only the Llama decoder is trained (see `freeze_vision` in the training script for why).",
        "",
    ]
    lines += card_results(metrics, [
        "Attribute accuracy: fraction of ground-truth attributes (shape count, background texture and colour,",
        "and size/colour/kind of every object at its cell) stated correctly in the greedy caption."], train_info, config)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "sage_ext" / "fixtures")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed for determinism)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-scenes", type=int, default=100)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (faster, learns worse)")
    parser.add_argument("--target-steps", type=int, default=None, help="override the size's step count")
    parser.add_argument("--draft-steps", type=int, default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = torch.device(args.device)
    sizes = {role: dict(spec) for role, spec in SIZES[args.size].items()}
    if args.target_steps:
        sizes["target"]["steps"] = args.target_steps
    if args.draft_steps:
        sizes["draft"]["steps"] = args.draft_steps

    started = time.time()
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    encoder = ExampleEncoder(processor)
    print(f"tokenizer: {len(tokenizer)} tokens; caption prompt {len(encoder.prompt_ids(scenes.caption_prompt()))} ids",
          flush=True)
    eval_scenes = scenes.heldout_scenes(args.eval_scenes)

    results = {}
    for role in ("target", "draft"):
        torch.manual_seed(args.seed + (0 if role == "target" else 1))
        model = build_model(sizes[role], tokenizer)
        params = count_params(model)
        print(f"{role}: {params / 1e6:.2f}M parameters", flush=True)
        info = train(model, encoder, sizes[role], device, data_seed=args.seed, name=role, bf16=args.bf16,
                     probe=AttributeProbe(encoder, device))
        results[role] = {"model": model, "params": params, "train": info}

    # Evaluate the models as they are saved (float16-rounded weights, float32 compute).
    for role in ("target", "draft"):
        model = results[role]["model"]
        model.half().float()
        texts, ids = greedy_captions(model, encoder, eval_scenes, device)
        results[role]["texts"], results[role]["ids"] = texts, ids
        metrics = caption_accuracy(eval_scenes, texts)
        metrics["qa_exact_match"] = qa_accuracy(model, encoder, eval_scenes, device)
        metrics["mean_caption_tokens"] = round(sum(len(i) for i in ids) / len(ids), 1)
        results[role]["metrics"] = metrics
    agreement = greedy_agreement(results["target"]["ids"], results["draft"]["model"], encoder, eval_scenes, device)
    results["draft"]["metrics"]["greedy_token_agreement_with_target"] = agreement
    total_seconds = round(time.time() - started, 1)

    summary = {"size": args.size, "device": str(device), "threads": args.threads, "eval_scenes": args.eval_scenes,
               "total_seconds": total_seconds}
    for role in ("target", "draft"):
        r = results[role]
        metrics = {"parameters": r["params"], **r["metrics"], "held-out scenes": args.eval_scenes,
                   "train seconds": r["train"]["train_seconds"], "device": f"{device} ({args.threads} threads)"}
        card = model_card(role, args.size, r["params"], r["train"], metrics, sizes[role])
        save_pair_member(r["model"], processor, args.out_dir / role, card)
        summary[role] = {"params": r["params"], **r["metrics"], **r["train"]}
        print(f"{role}: {json.dumps(summary[role])}", flush=True)
        for text in r["texts"][:2]:
            print(f"  e.g. {text}")
    (args.out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done in {total_seconds}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
