"""Loading a model's processor, also where transformers cannot build it whole.

transformers builds the Qwen2-VL and Qwen2.5-VL processors with a video processor, and its video
processors need torchvision. Without torchvision, ``AutoProcessor.from_pretrained`` fails for these
families even for image-only use. `load_processor` then builds the same processor without its video
part (`image_only_processor`): images and text are processed exactly as by the full processor, and
passing ``videos=`` raises an error that says to install torchvision.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

#: Processor classes whose only torchvision-bound part is the video processor.
_VIDEO_PROCESSOR_FAMILIES = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def image_only_processor(processor_class: str, image_processor, tokenizer, chat_template: str | None = None):
    """A `processor_class` (``Qwen2VLProcessor`` or ``Qwen2_5_VLProcessor``) without its video processor."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    if processor_class not in _VIDEO_PROCESSOR_FAMILIES:
        raise ValueError(f"no image-only form of {processor_class!r}; known: {', '.join(_VIDEO_PROCESSOR_FAMILIES)}")
    base = getattr(transformers, processor_class)

    class ImageOnlyProcessor(base):
        # The attributes ProcessorMixin manages come from __init__'s signature: no video_processor here.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def __call__(self, images=None, text=None, videos=None, **kwargs):
            if videos is not None:
                raise ValueError(f"this {processor_class} was built without its video processor because "
                                 "torchvision is not installed; install torchvision to process videos")
            return super().__call__(images=images, text=text, **kwargs)

        def save_pretrained(self, save_directory, **kwargs):
            # Saved under the real class name, so AutoProcessor loads the files where torchvision exists.
            out = super().save_pretrained(save_directory, **kwargs)
            config_path = Path(save_directory) / "processor_config.json"
            if config_path.exists():
                config = json.loads(config_path.read_text())
                config["processor_class"] = processor_class
                config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            return out

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"ImageOnly{processor_class}"
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def _saved_processor_class(path: str) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        file = Path(path) / name
        if file.is_file():
            value = json.loads(file.read_text()).get("processor_class")
            if value:
                return value
    return None


def load_processor(path_or_id: str, local_files_only: bool = False):
    """``AutoProcessor.from_pretrained``; for Qwen2-VL / Qwen2.5-VL folders on a machine without
    torchvision, the same processor without its video part (see the module docstring)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path_or_id, local_files_only=local_files_only)
    except (OSError, ImportError, ValueError, AttributeError):
        processor_class = _saved_processor_class(path_or_id) if Path(path_or_id).is_dir() else None
        if torchvision_available() or processor_class not in _VIDEO_PROCESSOR_FAMILIES:
            raise
    image_processor = AutoImageProcessor.from_pretrained(path_or_id, local_files_only=local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, local_files_only=local_files_only)
    template_file = Path(path_or_id) / "chat_template.jinja"
    chat_template = template_file.read_text() if template_file.is_file() else getattr(tokenizer, "chat_template", None)
    return image_only_processor(processor_class, image_processor, tokenizer, chat_template)
