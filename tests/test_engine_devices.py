"""Models split over several devices (``device_map``), checked on one CPU.

A cache whose layers sit on two devices cannot be made on a CPU-only machine, so these tests route part of the
cache layers through the commit's path for other devices (``sage_ext.engine.caches.CacheGroups``: group 0 is compacted
by ``commit_tree_``, every other group — the layers a device_map puts on a second GPU, or a draft on another
device than the target — by ``kv_compact_`` in the same workspace commit) with the engine's seam
``elsewhere_from = (target_index, draft_index)``: layers from that index on form a group of their own even though
they are on the engine's device. Checked: after every step both caches equal a
recomputation (tests/test_engine_kv.py), greedy output equals ``target.generate``, and seeded sampling gives
the same tokens split or not. Also: ``--device-map`` of the CLI without accelerate is a one-line usage error.

On a machine with a GPU and accelerate (scripts/device_check.sh) one more test splits a model for real: the
target's embeddings and first layer on the GPU, its other layers and lm_head on the CPU (accelerate's
``dispatch_model`` with ``main_device="cpu"``, so each part runs where it sits), and the draft on the CPU.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from test_engine import POLICIES, hf_greedy
from test_engine_kv import MAX_NEW, run_with_cache_checks
from tiny_models import all_family_builders, correlated_draft, one_thread  # noqa: F401  (autouse fixture)
from transformers import DynamicCache

from sage_ext import cli
from sage_ext.engine.caches import CacheGroups, RowCache
from sage_ext.engine import SpeculativeGenerator

BUILDERS = all_family_builders()
FAMILIES = ["llama", "llava", "qwen2_vl"]
#: (target, draft) first layer index committed "elsewhere" (the tiny models have 2 layers): the second layer
#: of each on another device; the whole target elsewhere; the whole draft elsewhere (draft on its own device)
SPLITS = {"second_layers": (1, 1), "target_all": (0, None), "draft_all": (None, 0)}
TREE_POLICIES = ["chain", "static", "dynamic", "sage", "sage_zero_lag"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    target, inputs = BUILDERS[request.param]()
    draft = correlated_draft(target, noise=0.1)
    return target, inputs, draft, hf_greedy(target, inputs, max_new_tokens=MAX_NEW)


def test_cache_groups_partition_rows_by_device():
    cache = RowCache(batch=2, capacity=8)
    for row in range(2):  # three layers, row r's layer i holding 10 r + i
        prefill = DynamicCache()
        for layer in range(3):
            prefill.update(torch.full((1, 1, 5, 4), float(layer + 10 * row)), torch.zeros(1, 1, 5, 4), layer)
        assert cache.load_row(row, prefill) == 5
    cpu = torch.device("cpu")

    def first_values(groups, row):
        return [[float(tensors[0, 0, 0, 0]) for tensors in group[::2]] for group in groups.tensors(row)]

    assert first_values(CacheGroups(cache, cpu), 0) == [[0.0, 1.0, 2.0]]
    split = CacheGroups(cache, cpu, 1)
    assert first_values(split, 1) == [[10.0], [11.0, 12.0]]
    assert first_values(CacheGroups(cache, cpu, 0), 0) == [[], [0.0, 1.0, 2.0]]  # group 0 empty: nothing here
    assert [len(tensors) for tensors in split.tensors(0)] == [2, 4]
    assert all(tensor.shape == (1, 1, 8, 4) for group in split.tensors(1) for tensor in group)  # a row's view
    cache.keep_rows([1])  # row 0 finished: the views are listed again
    assert first_values(split, 0) == [[10.0], [11.0, 12.0]]


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("policy", TREE_POLICIES)
def test_split_commit_keeps_caches_and_output(family, policy, split):
    target, inputs, draft, reference = family
    out, taus = run_with_cache_checks(target, draft, inputs, POLICIES[policy](), elsewhere_from=SPLITS[split])
    assert torch.equal(out.sequences, reference)
    assert max(taus) > 0  # accepted draft tokens: the compaction moved rows


def test_split_commit_autoregressive(family):
    target, inputs, _, reference = family
    out, _ = run_with_cache_checks(target, None, inputs, "ar", elsewhere_from=(1, None))
    assert torch.equal(out.sequences, reference)


@pytest.mark.parametrize("policy", ["static", "sage"])
def test_split_commit_sampling_same_tokens(family, policy):
    target, inputs, draft, _ = family
    outputs = []
    for split in [(None, None), (1, 1), (0, 0)]:
        engine = SpeculativeGenerator(target, draft, POLICIES[policy]())
        engine.elsewhere_from = split
        outputs.append(engine.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=True, temperature=1.5,
                                       generator=torch.Generator().manual_seed(7)).sequences)
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])
    assert outputs[0].shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is not None, reason="accelerate is installed here")
@pytest.mark.parametrize("command", ["generate", "bench"])
def test_cli_device_map_without_accelerate(command, tmp_path, capsys):
    image = tmp_path / "scene.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    argv = [command, "--device-map", "auto", "--max-new-tokens", "4"]
    if command == "generate":
        argv += ["--image", str(image), "--prompt", "Describe the image."]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "accelerate" in err[0] and "--device-map" in err[0]


def test_cli_device_map_parsing():
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "--device-map", "balanced"])
    assert args.device_map == "balanced"
    assert parser.parse_args(["generate", "--image", "x", "--prompt", "y"]).device_map is None
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--image", "x", "--prompt", "y", "--device-map", "everywhere"])


# --------------------------------------------------------------------------------------------
# a real split over a GPU and the CPU (skipped without a GPU or accelerate)
# --------------------------------------------------------------------------------------------
def split_device_map(model: torch.nn.Module, gpu_layers: int = 1) -> dict:
    """accelerate device map: the decoder's first ``gpu_layers`` layers and everything before them on GPU 0,
    the later layers, the final norm and the lm_head on the CPU."""
    layers = next(name for name, module in model.named_modules()
                  if name.endswith("layers") and isinstance(module, torch.nn.ModuleList))
    device_map = {}

    def place(module: torch.nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == layers:
                for index in range(len(child)):
                    device_map[f"{full}.{index}"] = 0 if index < gpu_layers else "cpu"
            elif layers.startswith(full + "."):
                place(child, full + ".")
            else:
                device_map[full] = "cpu" if name in ("norm", "lm_head") else 0

    place(model, "")
    return device_map


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="needs accelerate")
@pytest.mark.parametrize("family_name", ["llama", "llava"])
@pytest.mark.parametrize("policy", ["chain", "static", "sage"])
def test_split_over_gpu_and_cpu(family_name, policy):
    import copy

    from accelerate import dispatch_model

    from sage_ext import ops

    assert ops.cuda_available(), "sage_ext was built without its CUDA kernels (see tests/cuda_helpers.py)"
    target, inputs = BUILDERS[family_name]()
    draft = correlated_draft(target, noise=0.1)  # stays on the CPU: the draft on another device
    split = dispatch_model(copy.deepcopy(target), split_device_map(target), main_device="cpu",
                           skip_keys=getattr(target, "_skip_keys_device_placement", None))
    devices = {p.device.type for p in split.parameters()}
    assert devices == {"cuda", "cpu"}, devices
    gpu_inputs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    reference = hf_greedy(split, gpu_inputs, max_new_tokens=MAX_NEW).cpu()
    out, taus = run_with_cache_checks(split, draft, gpu_inputs, POLICIES[policy]())
    assert torch.equal(out.sequences.cpu(), reference)
    assert max(taus) > 0


@pytest.mark.parametrize("family_name", ["llama", "llava"])
def test_split_device_map_covers_every_parameter(family_name):
    target, _ = BUILDERS[family_name]()
    device_map = split_device_map(target)
    names = [name for name, _ in target.named_parameters()]
    for name in names:  # every parameter lies under exactly one mapped module
        assert sum(name.startswith(key + ".") for key in device_map) == 1, name
    layer_keys = sorted(key for key in device_map if key.split(".")[-1].isdigit())
    assert [device_map[key] for key in layer_keys] == [0, "cpu"]
    assert device_map["lm_head"] == "cpu"
