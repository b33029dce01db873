"""transformers' custom-generation entry point for sage_ext.

transformers' ``model.generate(custom_generate=FOLDER, trust_remote_code=True, ...)`` loads
``FOLDER/custom_generate/generate.py`` and calls its ``generate(model, **arguments)`` instead of its own
decoding. FOLDER is the sage_ext package folder (``sage_ext.custom_generate_path()``), so that file is
``sage_ext/custom_generate/generate.py``; it maps ``assistant_model`` (the draft), ``policy``, the generation
settings and ``streamer`` onto the sage_ext engine. Imported as ``sage_ext.custom_generate`` it is the same code.
"""
from .generate import SpeculativeGenerateOutput, generate

__all__ = ["generate", "SpeculativeGenerateOutput"]
