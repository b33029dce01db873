"""`sage_ext.processors`: the Qwen2-VL processor without its video part (transformers needs torchvision for that
part only), saved under the real class name and loaded back from a folder with the same outputs."""
import json

import pytest
import torch
import transformers
from PIL import Image

from sage_ext.processors import image_only_processor, load_processor, torchvision_available

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
            "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def small_qwen2vl_processor(processor_class: str = "Qwen2VLProcessor"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Describe the image. A red circle on grass."] * 4, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    image_processor = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                               size={"shortest_edge": 64 * 64, "longest_edge": 256 * 256})
    return image_only_processor(processor_class, image_processor, tokenizer, TEMPLATE)


def prompt(processor) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


@pytest.mark.parametrize("processor_class", ["Qwen2VLProcessor", "Qwen2_5_VLProcessor"])
def test_image_only_processor_expands_the_image_token_per_merged_patch(processor_class):
    processor = small_qwen2vl_processor(processor_class)
    out = processor(text=prompt(processor), images=Image.new("RGB", (160, 96)), return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    assert (h, w) == (96 // 8, 160 // 8)  # a non-square grid, rows first
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((out["input_ids"] == image_id).sum()) == t * h * w // 4
    assert out["pixel_values"].shape == (t * h * w, 3 * 2 * 8 * 8)
    assert isinstance(processor, getattr(transformers, processor_class))


def test_videos_are_refused_with_the_reason():
    processor = small_qwen2vl_processor()
    with pytest.raises(ValueError, match="torchvision"):
        processor(text=prompt(processor), videos=[torch.zeros(2, 3, 32, 32)])


def test_saved_under_the_real_class_and_loaded_back_with_the_same_outputs(tmp_path):
    processor = small_qwen2vl_processor()
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    again = load_processor(str(tmp_path))
    assert type(again).__mro__[1].__name__ == "Qwen2VLProcessor" or torchvision_available()
    image = Image.new("RGB", (128, 200), (200, 30, 30))
    a = processor(text=prompt(processor), images=image, return_tensors="pt")
    b = again(text=prompt(again), images=image, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(a[key], b[key]), key


def test_other_processors_are_not_rebuilt(tmp_path):
    with pytest.raises(ValueError, match="no image-only form"):
        image_only_processor("LlavaProcessor", None, None)
    with pytest.raises((OSError, ValueError)):
        load_processor(str(tmp_path))  # an empty folder is not a processor
