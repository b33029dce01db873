"""`sage-ext` on bad input: one line on stderr naming the problem, a non-zero exit, nothing written, and
(where the input can be checked first) no model loaded. `--debug` / SAGE_EXT_DEBUG=1 give the traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sage_ext import cli  # noqa: E402
from sage_ext.cli import models  # noqa: E402
from sage_ext.fixtures import DRAFT_DIR, TARGET_DIR, scenes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    scenes.heldout_scenes(1, start=400)[0].render().save(path)
    return path


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if a model is loaded: these inputs must be refused before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for an input that can be checked first")
    monkeypatch.setattr(models, "load_pair", refuse)  # the commands call models.load_pair
    monkeypatch.setattr(models, "load_model", refuse)


def run_cli(argv, capsys, tmp_path):
    """cli.main(argv) -> (exit code, stdout, stderr lines); also checks that nothing appeared in tmp_path."""
    before = sorted(tmp_path.rglob("*"))
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert sorted(tmp_path.rglob("*")) == before, "a failed command wrote files"
    return code, out, [line for line in err.splitlines() if line.strip()]


def generate_args(image, tmp_path, *extra):
    return ["generate", "--image", str(image), "--prompt", "Describe the image.", "--stats-json",
            str(tmp_path / "stats.json"), *extra]


def assert_one_line(code, out, err, expected_code, *fragments):
    assert code == expected_code
    assert out == ""
    assert len(err) == 1, err
    assert err[0].startswith("sage-ext ") and "error:" in err[0]
    for fragment in fragments:
        assert fragment in err[0], err[0]


@pytest.mark.parametrize("case, fragments", [
    ("missing", ["no such file"]),
    ("text_as_png", ["not an image file PIL can read"]),
    ("folder", ["is a folder, not an image file"]),
    ("truncated_jpeg", ["not an image file PIL can read", "truncated"]),
])
def test_bad_image_paths(case, fragments, tmp_path, capsys, no_loading):
    images = tmp_path.parent / f"{tmp_path.name}_inputs"
    images.mkdir()
    path = {"missing": images / "nope.png", "text_as_png": images / "notes.png", "folder": images,
            "truncated_jpeg": images / "cut.jpg"}[case]
    if case == "text_as_png":
        path.write_text("not an image")
    if case == "truncated_jpeg":  # a whole header, half the pixel data
        Image.effect_noise((64, 64), 50).convert("RGB").save(path, quality=90)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, out, err = run_cli(generate_args(path, tmp_path), capsys, tmp_path)
    assert_one_line(code, out, err, 2, f"--image {path}", *fragments)


@pytest.mark.parametrize("flag, value, fragment", [
    ("--max-new-tokens", "0", "argument --max-new-tokens: must be >= 1, got 0"),
    ("--max-new-tokens", "many", "argument --max-new-tokens: expected an integer, got 'many'"),
    ("--temperature", "-1", "argument --temperature: must be >= 0, got -1"),
    ("--top-p", "2", "argument --top-p: must be in [0, 1], got 2"),
    ("--top-p", "-0.1", "argument --top-p: must be in [0, 1], got -0.1"),
    ("--top-k", "-3", "argument --top-k: must be >= 0, got -3"),
    ("--repetition-penalty", "0", "argument --repetition-penalty: must be > 0, got 0"),
    ("--draft-prune-ratio", "1.5", "argument --draft-prune-ratio: must be in [0, 1], got 1.5"),
    ("--threads", "0", "argument --threads: must be >= 1, got 0"),
    ("--temperature", "nan", "argument --temperature: expected a finite number, got 'nan'"),
])
def test_numbers_out_of_range(flag, value, fragment, image_path, tmp_path, capsys, no_loading):
    code, out, err = run_cli(generate_args(image_path, tmp_path, flag, value), capsys, tmp_path)
    assert_one_line(code, out, err, 2, fragment)


def test_policy_name_lists_the_choices(image_path, tmp_path, capsys, no_loading):
    code, out, err = run_cli(generate_args(image_path, tmp_path, "--policy", "beam"), capsys, tmp_path)
    assert_one_line(code, out, err, 2, "invalid choice: 'beam'", "'sage'", "'static'", "'ar'")


def test_policy_choices_are_in_the_help(capsys):
    assert cli.main(["generate", "--help"]) == 0
    assert "{ar,chain,dynamic,sage,sage_cost,static}" in capsys.readouterr().out


@pytest.mark.parametrize("policy_args, fragment", [
    ("foo=3", "policy 'sage_cost' has no parameter 'foo'; its parameters: d_min, d_max"),
    ("n_max", "expected key=value, got 'n_max'"),
    ("n_max=8", "first_round_paths has more nodes than n_max"),
    ("lag=no", "lag='no' is not a value"),
    ("lag=1", "lag must be True or False, got '1'"),
    ("n_max=1e3", "n_max must be an integer, got '1e3' (write 1000)"),
])
def test_policy_args_are_checked_against_the_policy(policy_args, fragment, image_path, tmp_path, capsys, no_loading):
    argv = generate_args(image_path, tmp_path, "--policy-args", policy_args)
    code, out, err = run_cli(argv, capsys, tmp_path)
    assert_one_line(code, out, err, 2, "--policy-args", fragment)


def test_policy_args_of_another_policy(image_path, tmp_path, capsys, no_loading):
    argv = generate_args(image_path, tmp_path, "--policy", "chain", "--policy-args", "n_max=3")
    code, out, err = run_cli(argv, capsys, tmp_path)
    assert_one_line(code, out, err, 2, "policy 'chain' has no parameter 'n_max'; its parameters: length")


def test_policy_args_read_lowercase_booleans_and_lists():
    from sage_ext.cli.validation import parse_policy
    assert parse_policy("sage", "lag=false,d_max=10").lag is False
    assert parse_policy("sage_cost", "chains=FALSE").chains is False
    assert parse_policy("static", "paths=[[0],[0,0]]").paths == [[0], [0, 0]]


def test_bench_has_no_policy_args(tmp_path, capsys, no_loading):
    """bench runs the policies it names with their own settings: it takes no --policy-args (it never could)."""
    code, out, err = run_cli(["bench", "--policy-args", "n_max=3"], capsys, tmp_path)
    assert code == 2 and out == "" and len(err) == 1
    assert err[0].startswith("sage-ext: error: unrecognized arguments: --policy-args")


@pytest.mark.parametrize("argv, fragment", [
    (["demo", "--plot", "{tmp}"], "--plot {tmp}: the plot is a PNG file"),
    (["demo", "--plot", "{tmp}/plot.jpg"], "the plot is a PNG file; give a path ending in .png"),
    (["demo", "--plot", "{tmp}/no/plot.png"], "folder {tmp}/no does not exist"),
    (["bench", "--name", "sub/name"], "--name 'sub/name': a file stem without a folder"),
])
def test_output_paths_are_checked_before_any_work(argv, fragment, tmp_path, capsys, no_loading):
    code, out, err = run_cli([part.format(tmp=tmp_path) for part in argv], capsys, tmp_path)
    assert_one_line(code, out, err, 2, fragment.format(tmp=tmp_path))


def test_stats_json_that_is_a_folder(image_path, tmp_path, capsys, no_loading):
    argv = ["generate", "--image", str(image_path), "--prompt", "Describe.", "--stats-json", str(tmp_path)]
    code, out, err = run_cli(argv, capsys, tmp_path)
    assert_one_line(code, out, err, 2, f"--stats-json {tmp_path}: is a folder")


def test_empty_prompt(image_path, tmp_path, capsys, no_loading):
    argv = ["generate", "--image", str(image_path), "--prompt", "  ", "--stats-json", str(tmp_path / "s.json")]
    code, out, err = run_cli(argv, capsys, tmp_path)
    assert_one_line(code, out, err, 2, "--prompt is empty")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_on_a_cpu_only_torch(image_path, tmp_path, capsys, no_loading):
    code, out, err = run_cli(generate_args(image_path, tmp_path, "--device", "cuda"), capsys, tmp_path)
    assert_one_line(code, out, err, 2, "--device cuda:", "use --device cpu")


def test_unknown_device_name(image_path, tmp_path, capsys, no_loading):
    code, out, err = run_cli(generate_args(image_path, tmp_path, "--device", "gpu0"), capsys, tmp_path)
    assert_one_line(code, out, err, 2, "--device gpu0: not a device name")


@pytest.mark.parametrize("target, fragment", [
    ("./no/such/model", "no such model folder"),
    ("/tmp/definitely/not/here", "no such model folder"),
])
def test_missing_model_folder(target, fragment, image_path, tmp_path, capsys, no_loading):
    argv = generate_args(image_path, tmp_path, "--target", target, "--draft", "fixture")
    code, out, err = run_cli(argv, capsys, tmp_path)
    assert_one_line(code, out, err, 2, f"--target {target}", fragment)


def test_folder_that_is_not_a_model(image_path, tmp_path, capsys, no_loading):
    folder = tmp_path.parent / f"{tmp_path.name}_empty_model"
    folder.mkdir()
    argv = generate_args(image_path, tmp_path, "--target", "fixture", "--draft", str(folder))
    code, out, err = run_cli(argv, capsys, tmp_path)
    assert_one_line(code, out, err, 2, f"--draft {folder}: folder has no config.json")


def test_draft_required_for_a_non_fixture_target(image_path, tmp_path, capsys, no_loading):
    argv = generate_args(image_path, tmp_path, "--target", str(TARGET_DIR))
    code, out, err = run_cli(argv, capsys, tmp_path)
    assert_one_line(code, out, err, 2, "--draft is needed with --policy sage")


def test_uncached_hub_id_offline_fails_at_once(image_path, tmp_path, capsys, no_loading, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = generate_args(image_path, tmp_path, "--target", "nosuchorg/nosuchmodel", "--draft", "fixture")
    code, out, err = run_cli(argv, capsys, tmp_path)
    assert_one_line(code, out, err, 2, "--target nosuchorg/nosuchmodel: not a local folder and not in the Hugging "
                    "Face cache", "HF_HUB_OFFLINE=1")


def test_hub_id_without_network_fails_fast_with_the_reason(image_path, tmp_path):
    """No offline mode: the Hub is probed for a few seconds instead of transformers' minutes of retries."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on the discard port
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    argv = generate_args(image_path, tmp_path, "--target", "nosuchorg/nosuchmodel", "--draft", "fixture")
    proc = subprocess.run([sys.executable, "-m", "sage_ext", *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(err) == 1 and "the Hugging Face Hub is unreachable: cannot reach 127.0.0.1:9" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_bench_and_demo_check_their_inputs_too(tmp_path, capsys, no_loading):
    code, out, err = run_cli(["bench", "--repeats", "0", "--out", str(tmp_path / "b")], capsys, tmp_path)
    assert_one_line(code, out, err, 2, "argument --repeats: must be >= 1, got 0")
    code, out, err = run_cli(["bench", "--policies", "sage", "beam"], capsys, tmp_path)
    assert_one_line(code, out, err, 2, "argument --policies: invalid choice: 'beam'")
    code, out, err = run_cli(["demo", "--plot", str(tmp_path / "missing" / "demo.png")], capsys, tmp_path)
    assert_one_line(code, out, err, 2, "--plot", "does not exist")


def _save_model(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def test_draft_of_another_family_is_one_line(image_path, tmp_path, capsys):
    from tiny_vlms import tiny_qwen2_vl

    qwen2_vl, _ = tiny_qwen2_vl()
    draft = _save_model(qwen2_vl, tmp_path.parent / f"{tmp_path.name}_qwen2_vl")
    capsys.readouterr()  # saving's progress bars (shown unless an earlier CLI run turned them off)
    code, out, err = run_cli(generate_args(image_path, tmp_path, "--target", "fixture", "--draft", str(draft)),
                             capsys, tmp_path)
    assert_one_line(code, out, err, 1, "must be the same model family")


def test_a_model_without_sdpa_loads_with_eager_attention(tmp_path):
    """A class without sdpa (Gemma 2) is loaded with eager attention, which takes tree masks too."""
    from tiny_vlms_more import tiny_gemma2

    folder = _save_model(tiny_gemma2()[0], tmp_path / "gemma2")
    model = models.load_model(str(folder), torch.device("cpu"), torch.float32)
    assert type(model).__name__ == "Gemma2ForCausalLM" and model.config._attn_implementation == "eager"


def test_a_folder_no_generation_class_knows_is_one_line(image_path, tmp_path, capsys):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vision_only = _save_model(CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                               num_attention_heads=2, image_size=16, patch_size=4)),
                              tmp_path.parent / f"{tmp_path.name}_clip")
    capsys.readouterr()  # saving's progress bars (shown unless an earlier CLI run turned them off)
    code, out, err = run_cli(generate_args(image_path, tmp_path, "--target", "fixture", "--draft", str(vision_only)),
                             capsys, tmp_path)
    assert_one_line(code, out, err, 1, "as a generation model: no generation class knows its config")


def test_draft_with_another_vocabulary_is_one_line(image_path, tmp_path, capsys):
    from transformers import AutoConfig, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(DRAFT_DIR)
    config.text_config.vocab_size += 1000
    torch.manual_seed(0)
    draft = _save_model(LlavaForConditionalGeneration(config), tmp_path.parent / f"{tmp_path.name}_vocab")
    capsys.readouterr()  # saving's progress bars (shown unless an earlier CLI run turned them off)
    code, out, err = run_cli(generate_args(image_path, tmp_path, "--target", "fixture", "--draft", str(draft)),
                             capsys, tmp_path)
    assert_one_line(code, out, err, 1, "target and draft vocabularies differ (target 440, draft 1440 logits)")


def test_debug_flag_and_environment_show_the_traceback(image_path, tmp_path, capsys, monkeypatch, no_loading):
    with pytest.raises(cli.UsageError, match="no such file"):
        cli.main(generate_args(tmp_path / "nope.png", tmp_path, "--debug"))
    monkeypatch.setenv("SAGE_EXT_DEBUG", "1")
    with pytest.raises(cli.UsageError, match="--prompt is empty"):
        cli.main(["generate", "--image", str(image_path), "--prompt", ""])


def test_python_dash_m_bad_input_is_one_line_and_debug_gives_a_traceback(tmp_path):
    argv = [sys.executable, "-m", "sage_ext", "generate", "--image", str(tmp_path / "nope.png"), "--prompt", "hi"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"sage-ext generate: error: --image {tmp_path / 'nope.png'}: no such file"
    proc = subprocess.run([*argv, "--debug"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr
    assert "UsageError: --image" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_bundled_pair_is_named(capsys, tmp_path, image_path, no_loading):
    code, out, err = run_cli(generate_args(image_path, tmp_path, "--target", "fixture-gpt9"), capsys, tmp_path)
    assert_one_line(code, out, err, 2, "fixture-gpt9", "fixture-qwen2vl")


def test_bench_with_own_target_needs_its_draft(capsys, tmp_path, no_loading):
    code, out, err = run_cli(["bench", "--target", str(TARGET_DIR), "--out", str(tmp_path / "b")], capsys, tmp_path)
    assert_one_line(code, out, err, 2, "--draft is needed")


@pytest.mark.parametrize("pair", ["llava", "qwen2vl"])
def test_pair_flag_picks_that_pairs_models(pair, tmp_path, monkeypatch):
    import dataclasses

    from sage_ext.cli.validation import validate_args
    from sage_ext.fixtures import PAIRS

    if not (PAIRS[pair].target_dir / "config.json").exists():  # a pair trained into a folder of its own
        folders = {role: tmp_path / role for role in ("target", "draft")}
        for folder in folders.values():
            folder.mkdir()
            (folder / "config.json").write_text("{}")
        monkeypatch.setitem(PAIRS, pair, dataclasses.replace(PAIRS[pair], target_dir=folders["target"],
                                                             draft_dir=folders["draft"]))
    args = cli.build_parser().parse_args(["demo", "--pair", pair, "--device", "cpu"])
    validate_args(args)
    assert (args.target, args.draft) == (str(PAIRS[pair].target_dir), str(PAIRS[pair].draft_dir))
    args = cli.build_parser().parse_args(["generate", "--target", f"fixture-{pair}", "--image", "x", "--prompt", "p"])
    assert models.resolve_model(args.target, "draft") == str(PAIRS[pair].draft_dir)


def test_a_missing_bundled_pair_says_how_to_train_it(capsys, tmp_path, monkeypatch, no_loading):
    import dataclasses

    from sage_ext.fixtures import PAIRS

    gone = dataclasses.replace(PAIRS["qwen2vl"], target_dir=tmp_path / "nothing", draft_dir=tmp_path / "nothing")
    monkeypatch.setitem(PAIRS, "qwen2vl", gone)
    code, out, err = run_cli(["demo", "--pair", "qwen2vl"], capsys, tmp_path)
    assert_one_line(code, out, err, 2, "qwen2vl pair is not in this installation", "train_qwen2vl_fixture.py")


def test_bench_with_a_bundled_target_takes_its_draft():
    from sage_ext.cli.validation import validate_args

    args = cli.build_parser().parse_args(["bench", "--target", "fixture", "--device", "cpu"])
    validate_args(args)
    assert (args.target, args.draft) == (str(TARGET_DIR), str(DRAFT_DIR))
