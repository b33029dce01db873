"""`sage-ext` command line on the bundled fixture pair: demo, generate, bench (small settings)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sage_ext import cli  # noqa: E402
from sage_ext.cli import demo, models, tuning, validation  # noqa: E402
from sage_ext.fixtures import DRAFT_DIR, PAIRS, TARGET_DIR, scenes  # noqa: E402


def test_python_dash_m_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "sage_ext", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo", "generate", "bench"):
        assert command in out.stdout


def test_policy_overrides_are_parsed():
    policy = validation.parse_policy("sage", "n_max=40,lag=False,d_max=10")
    assert (policy.n_max, policy.lag, policy.d_max_init) == (40, False, 10)
    with pytest.raises(cli.UsageError, match="unknown policy 'no-such-policy'; choose from"):
        validation.parse_policy("no-such-policy")


def test_demo_runs_end_to_end_and_writes_its_plot(tmp_path, capsys):
    plot = tmp_path / "demo.png"
    assert cli.main(["demo", "--scenes", "1", "--max-new-tokens", "24", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "tau" in out and "speedup" in out and "identical to target-only greedy: yes" in out
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_slow_speedup_note_names_the_likely_cause():
    assert demo.slow_speedup_note("sage", 1.3, 8.0, threads=2, cores=2, load=3.5) is None
    busy = demo.slow_speedup_note("sage", 0.8, 8.0, threads=1, cores=2, load=3.5)
    assert busy.startswith("note: sage measured 0.80x") and "busy (load average 3.5 on 2 cores)" in busy
    assert "8.0x fewer target forwards" in busy
    oversubscribed = demo.slow_speedup_note("sage", 0.9, 5.0, threads=8, cores=2, load=0.2)
    assert "8 threads on 2 cores" in oversubscribed and "--threads 1" in oversubscribed and "busy" not in oversubscribed
    assert "--threads 1" in demo.slow_speedup_note("chain", 0.9, 5.0, threads=2, cores=4, load=0.5)
    assert "timing noise" in demo.slow_speedup_note("sage", 0.9, 5.0, threads=1, cores=4, load=None)


def test_demo_warms_up_notes_a_slowdown_and_plots_steps_and_speed(tmp_path, capsys, monkeypatch):
    calls, plotted = [], []
    real_run_engine, real_plot = demo.run_engine, demo.plot_demo

    def slow_speculation(engine, inputs, max_new_tokens, device, **kwargs):  # timings made up: sage looks slow
        calls.append(engine.policy.name)
        run = real_run_engine(engine, inputs, max_new_tokens, device, **kwargs)
        if engine.policy.name != "ar":
            run["seconds"] *= 1000
        return run

    def recording_plot(results, policy_name, path):
        plotted.append(real_plot(results, policy_name, path))
        return plotted[-1]

    warmups = []
    from sage_ext.engine import SpeculativeGenerator

    real_generate = SpeculativeGenerator.generate

    def counting_generate(self, *args, **kwargs):
        if not calls:  # before the first timed run: the warm-ups
            warmups.append((self.policy.name, kwargs.get("max_new_tokens")))
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(demo, "run_engine", slow_speculation)  # where cmd_demo looks them up
    monkeypatch.setattr(demo, "plot_demo", recording_plot)
    monkeypatch.setattr(SpeculativeGenerator, "generate", counting_generate)
    plot = tmp_path / "demo.png"
    assert cli.main(["demo", "--scenes", "2", "--max-new-tokens", "40", "--plot", str(plot), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert sorted(warmups) == [("ar", 32), ("sage_cost", 32)]  # one warm-up per engine, before any timing
    assert "note: sage_cost measured" in out and "slower than target-only" in out and "Likely cause" in out

    (data,) = plotted
    assert data["policy"] == "sage_cost" and len(data["scenes"]) == 2  # the default policy
    for scene in data["scenes"]:
        per_step = scene["tokens_per_step"]
        assert scene["identical_to_ar"] and set(scene["tokens_per_second"]) == {"ar", "sage_cost"}
        assert len(per_step) == len(scene["tree_size"]) and min(per_step) >= 1
        assert sum(per_step) / len(per_step) > 2  # the fixture draft is accepted: several tokens per forward
        assert all(size >= 1 for size in scene["tree_size"])
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] > 300


@pytest.mark.parametrize("extra", [[], ["--capture-draft"],
                                   ["--repetition-penalty", "3"]])  # strong enough to change this caption
def test_generate_streams_the_target_greedy_text(tmp_path, capsys, extra):
    scene = scenes.heldout_scenes(1, start=300)[0]
    image_path = tmp_path / "scene.png"
    scene.render().save(image_path)
    args = ["generate", "--target", str(TARGET_DIR), "--draft", str(DRAFT_DIR), "--image", str(image_path),
            "--prompt", scenes.CAPTION_INSTRUCTION, "--max-new-tokens", "40", "--policy", "sage", *extra]
    assert cli.main(args) == 0
    streamed = capsys.readouterr().out.strip()

    target, _, processor = models.load_pair(str(TARGET_DIR), None, torch.device("cpu"), torch.float32)
    inputs = processor(text=scenes.caption_prompt(), images=Image.open(image_path).convert("RGB"), return_tensors="pt")
    penalty = float(extra[1]) if extra[:1] == ["--repetition-penalty"] else 1.0
    with torch.inference_mode():
        out = target.generate(**inputs, max_new_tokens=40, do_sample=False, repetition_penalty=penalty)
    expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert streamed == expected
    assert len(expected.split()) > 10
    if penalty != 1.0:  # the penalty mattered
        with torch.inference_mode():
            assert not torch.equal(out, target.generate(**inputs, max_new_tokens=40, do_sample=False))


def test_generate_with_a_text_only_draft(tmp_path, capsys):
    """--draft naming a text-only causal LM of the target's tokenizer (here the bundled draft's decoder and head
    saved as a LlamaForCausalLM, its vision left out): the output is the target's greedy decoding, and the draft,
    blind, is still accepted."""
    from transformers import AutoModelForCausalLM

    from sage_ext.families.model_access import text_decoder

    vlm_draft = models.load_model(str(DRAFT_DIR), torch.device("cpu"), torch.float32)
    text_draft = AutoModelForCausalLM.from_config(vlm_draft.config.get_text_config(decoder=True))
    text_draft.model.load_state_dict(text_decoder(vlm_draft).state_dict())
    text_draft.lm_head.load_state_dict(vlm_draft.get_output_embeddings().state_dict())
    text_draft.generation_config = vlm_draft.generation_config
    text_draft.save_pretrained(tmp_path / "text_draft")
    scene = scenes.heldout_scenes(1, start=302)[0]
    image_path = tmp_path / "scene.png"
    scene.render().save(image_path)
    args = ["generate", "--target", str(TARGET_DIR), "--draft", str(tmp_path / "text_draft"), "--image",
            str(image_path), "--prompt", scenes.CAPTION_INSTRUCTION, "--max-new-tokens", "40", "--policy", "sage",
            "--json"]
    capsys.readouterr()
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    target, _, processor = models.load_pair(str(TARGET_DIR), None, torch.device("cpu"), torch.float32)
    inputs = processor(text=scenes.caption_prompt(), images=Image.open(image_path).convert("RGB"), return_tensors="pt")
    with torch.inference_mode():
        expected = target.generate(**inputs, max_new_tokens=40, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert result["new_token_ids"] == expected.tolist()
    assert result["stats"]["mean_tau"] > 0.5


def test_generate_reads_what_the_flags_leave_out_from_the_generation_config(tmp_path, capsys):
    """A checkpoint whose generation_config.json sets a length and stop strings: the CLI decodes as
    target.generate(**inputs) does with that config (it passes the tokenizer the stop strings need)."""
    import shutil

    target_dir = tmp_path / "target"
    shutil.copytree(TARGET_DIR, target_dir)
    target, _, processor = models.load_pair(str(target_dir), None, torch.device("cpu"), torch.float32)
    scene = scenes.heldout_scenes(1, start=301)[0]
    image_path = tmp_path / "scene.png"
    scene.render().save(image_path)
    inputs = processor(text=scenes.caption_prompt(), images=Image.open(image_path).convert("RGB"), return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        free = target.generate(**inputs, max_new_tokens=30, do_sample=False)[0, prompt_len:]
    stop = processor.tokenizer.decode(free[8:9])  # a word from the middle of the caption
    target.generation_config.max_new_tokens, target.generation_config.stop_strings = 20, [stop]
    target.generation_config.save_pretrained(target_dir)
    with torch.inference_mode():
        expected = target.generate(**inputs, tokenizer=processor.tokenizer, do_sample=False)[0, prompt_len:].tolist()
    assert len(expected) < 20  # the stop string ended it
    args = ["generate", "--target", str(target_dir), "--draft", str(DRAFT_DIR), "--image", str(image_path),
            "--prompt", scenes.CAPTION_INSTRUCTION, "--policy", "sage", "--json"]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["new_token_ids"] == expected


def test_bench_small_writes_json_and_chart_with_identical_outputs(tmp_path, capsys):
    args = ["bench", "--scenes", "1", "--repeats", "1", "--max-new-tokens", "24", "--no-tune",
            "--policies", "hf-assisted", "static", "sage", "--out-dir", str(tmp_path), "--name", "tiny"]
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert set(report["policies"]) == {"ar", "hf-assisted", "static", "sage"}
    assert report["checks"]["all_greedy_outputs_identical_to_ar"] is True
    for name in ("static", "sage"):
        row = report["policies"][name]
        assert row["tokens_per_target_forward"] == pytest.approx(row["mean_tau"] + 1)
        assert row["acceptance_by_depth"] and set(row["time_breakdown_seconds"]) >= {"target_verify", "draft_decode"}
    assert (tmp_path / "tiny.png").stat().st_size > 10_000
    table = (tmp_path / "tiny.md").read_text()
    assert "| sage | " in table and "| hf-assisted | " in table


@pytest.mark.parametrize("argv, ratio", [
    (["demo"], 0.0),  # the LLaVA pair: no pruning
    (["demo", "--pair", "qwen2vl"], PAIRS["qwen2vl"].draft_prune_ratio),
    (["bench", "--pair", "qwen2vl", "--draft-prune-ratio", "0"], 0.0),  # given: kept
    (["bench", "--target", "fixture-qwen2vl", "--draft", str(DRAFT_DIR)], 0.0),  # not the bundled draft
    (["generate", "--target", "fixture-qwen2vl", "--image", "IMAGE", "--prompt", "Describe the image."],
     PAIRS["qwen2vl"].draft_prune_ratio),
])
def test_the_draft_prune_ratio_defaults_to_the_bundled_drafts(tmp_path, argv, ratio):
    image = tmp_path / "scene.png"
    scenes.heldout_scenes(1)[0].render().save(image)
    args = cli.build_parser().parse_args([str(image) if a == "IMAGE" else a for a in argv])
    validation.validate_args(args)
    assert args.draft_prune_ratio == ratio
    assert PAIRS["qwen2vl"].draft_prune_ratio > 0


def test_bench_on_the_qwen2vl_pair_prunes_the_draft_and_stays_identical(tmp_path):
    args = ["bench", "--pair", "qwen2vl", "--scenes", "1", "--repeats", "1", "--max-new-tokens", "24", "--no-tune",
            "--policies", "hf-assisted", "sage", "sage-cost", "sage-cost-trees", "--out-dir", str(tmp_path),
            "--name", "qwen"]
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "qwen.json").read_text())
    assert report["pair"] == "qwen2vl" and report["draft_prune_ratio"] == PAIRS["qwen2vl"].draft_prune_ratio
    assert report["checks"]["all_greedy_outputs_identical_to_ar"] is True
    assert set(report["policies"]) == {"ar", "hf-assisted", "sage", "sage-cost", "sage-cost-trees"}  # the ablation, named
    assert "of the image tokens (draft prune ratio" in (tmp_path / "qwen.md").read_text()
    # vocabularies padded to different sizes: HF assisted generation gets the draft resized to the target's size
    assert "resized" in report["policies"]["hf-assisted"]["description"]


def test_hf_assisted_generation_gets_the_draft_resized_to_the_targets_vocabulary():
    from sage_ext.cli.bench import hf_assistant

    pair = PAIRS["qwen2vl"]
    target, draft, _ = models.load_pair(str(pair.target_dir), str(pair.draft_dir), torch.device("cpu"), torch.float32)
    target_vocab, draft_vocab = target.config.text_config.vocab_size, draft.config.text_config.vocab_size
    assert draft_vocab != target_vocab
    resized = hf_assistant(target, draft)
    assert resized.config.text_config.vocab_size == resized.get_output_embeddings().weight.shape[0] == target_vocab
    assert draft.config.text_config.vocab_size == draft.get_output_embeddings().weight.shape[0] == draft_vocab
    assert torch.equal(resized.get_output_embeddings().weight, draft.get_output_embeddings().weight[:target_vocab])
    assert hf_assistant(target, resized) is resized  # the same size: the draft itself


def test_bench_with_temperature_samples_every_entry_and_reports_tau(tmp_path):
    args = ["bench", "--scenes", "2", "--repeats", "1", "--max-new-tokens", "16", "--no-tune", "--temperature", "0.7",
            "--policies", "hf-greedy", "chain", "sage", "--out-dir", str(tmp_path)]
    assert cli.main(args) == 0
    (path,) = tmp_path.glob("e2e_t0.7_*.json")  # the file name says it sampled
    report = json.loads(path.read_text())
    assert report["temperature"] == 0.7 and "all_greedy_outputs_identical_to_ar" not in report["checks"]
    rows = report["policies"]
    assert all(row["identical_to_ar"] is None for row in rows.values())
    assert rows["chain"]["steps"] > 0 and rows["chain"]["tokens_per_target_forward"] > 1
    assert "n/a (sampling)" in path.with_suffix(".md").read_text()


def test_bench_samples_with_the_traversal_rule_when_asked(tmp_path):
    args = ["bench", "--scenes", "1", "--repeats", "1", "--max-new-tokens", "16", "--no-tune", "--temperature", "1",
            "--sampling-rule", "traversal", "--policies", "chain", "sage", "--out-dir", str(tmp_path)]
    assert cli.main(args) == 0
    (path,) = tmp_path.glob("e2e_t1_traversal_*.json")
    report = json.loads(path.read_text())
    assert report["sampling_rule"] == "traversal" and report["policies"]["sage"]["mean_tau"] > 0
    assert "verified by the traversal rule" in path.with_suffix(".md").read_text()


def test_sage_tuning_times_each_candidate_against_the_best_and_records_invalid_ones():
    target, draft, processor = models.load_pair(str(TARGET_DIR), str(DRAFT_DIR), torch.device("cpu"), torch.float32)
    inputs = models.scene_inputs(processor, PAIRS["llava"], scenes.heldout_scenes(1, start=5000), torch.device("cpu"),
                                 torch.float32)
    grid = {"n_max": [8], "d_max": [6]}  # n_max=8 is invalid with the paper's 25-node first round
    best, trials = tuning.tune_sage(target, draft, inputs, 16, torch.device("cpu"), grid)
    assert trials[0] == {"params": {"n_max": 8}, "error": "first_round_paths has more nodes than n_max"}
    timed = trials[1]
    assert timed["params"] == {"d_max": 6} and timed["against"] == {}
    assert timed["speedup_over_best"] > 0 and timed["mean_tau"] >= 0
    assert best in ({}, {"d_max": 6})
    assert (best == {"d_max": 6}) == (timed["speedup_over_best"] > 1.03)
