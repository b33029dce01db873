"""sage_ext: lossless tree speculative decoding (SAGE) for HuggingFace vision-language models.

- `sage_ext.ops`: the native tree-speculation ops (C++ on CPU, CUDA on GPU; contract in docs/OPS.md);
- `sage_ext.reference`: plain-PyTorch oracles of the same ops;
- `SpeculativeGenerator` / `generate` / `stream`: the engine driving an HF draft and target model with a tree
  policy (`"ar"`, `"chain"`, `"static"`, `"dynamic"`, `"sage"` or a policy object); `stream` yields the text
  (or token ids) as it is generated;
- `custom_generate_path()`: the folder for transformers' ``model.generate(custom_generate=...,
  trust_remote_code=True, assistant_model=draft)`` (sage_ext/custom_generate/generate.py);
- `sage_ext.families`: per-family adapters; `sage_ext.pruning`: draft-side visual token pruning;
- `sage_ext.cli`: the `sage-ext` command (demo, generate, bench); `sage_ext.fixtures`: the bundled
  draft/target pair and its procedural scene task.
"""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("sage_ext")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"


def _extension_missing(error: ImportError) -> ImportError:
    """The error to raise when the compiled extension ``sage_ext._C`` cannot be imported: most often the
    source tree shadows the installed package (``python -m sage_ext`` or ``import sage_ext`` run in the checkout
    after a non-editable ``pip install .``, whose ``_C`` lives only in site-packages)."""
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    installed = []
    for entry in sys.path:
        folder = os.path.join(os.path.abspath(entry or os.getcwd()), "sage_ext")
        if os.path.normcase(folder) != os.path.normcase(here) and os.path.isdir(folder) and any(
                name.startswith("_C.") for name in os.listdir(folder)):
            installed.append(folder)
    if installed:
        why = (f"the source folder {here} shadows the installed sage_ext in {installed[0]} (Python looks in the "
               f"current folder first). Run from another folder, or install for development with "
               f"`pip install --no-build-isolation -e .`")
    elif importlib.util.find_spec("sage_ext._C") is None:
        why = (f"sage_ext/_C is not built in {here}: install the package (`pip install --no-build-isolation .`, "
               f"or `-e .` for development) and import it from outside the source folder")
    else:
        why = f"it exists but failed to load ({error}); rebuild it against the installed torch ({sys.executable})"
    return ImportError(f"sage_ext's compiled extension sage_ext._C cannot be imported: {why}")


# torch first: it loads libtorch_cpu / libc10, which _C needs and otherwise finds only through its runpath
# (torch installed beside it); with torch in another site folder (a venv over system packages, --user) it would not
import torch as _torch  # noqa: F401,E402

try:
    from . import _C  # noqa: F401  (the compiled extension; registers torch.ops.sage_ext.*)
except ImportError as _error:
    if "_C" not in str(_error) and "sage_ext" not in str(_error):
        raise
    _missing = _extension_missing(_error)
    import sys as _sys

    if _sys.argv[:1] == ["-m"]:  # `python -m sage_ext` (runpy is still importing the package): one line, no traceback
        print(f"sage-ext: error: {_missing}", file=_sys.stderr)
        raise SystemExit(1) from None
    raise _missing from None

from . import ops, reference  # noqa: F401
from .engine import GenerationOutput, SpeculativeGenerator, StepDebug, generate, stream
from .engine.policies import (
    SPECVLM_TREE_PATHS,
    AutoregressivePolicy,
    ChainPolicy,
    DynamicTreePolicy,
    SagePolicy,
    StaticTreePolicy,
    TreePolicy,
)
from .engine.stats import GenerationStats, StepRecord


def custom_generate_path() -> str:
    """The folder to pass to transformers' ``generate(custom_generate=...)``: the installed sage_ext package,
    which holds ``custom_generate/generate.py`` (transformers' layout for a custom decoding method). Local code,
    so transformers asks for ``trust_remote_code=True``::

        out = target.generate(**inputs, custom_generate=sage_ext.custom_generate_path(), trust_remote_code=True,
                              assistant_model=draft, max_new_tokens=64)
    """
    import os

    return os.path.dirname(os.path.abspath(__file__))


__all__ = [
    "__version__",
    "custom_generate_path",
    "ops",
    "reference",
    "SpeculativeGenerator",
    "generate",
    "stream",
    "GenerationOutput",
    "StepDebug",
    "GenerationStats",
    "StepRecord",
    "TreePolicy",
    "AutoregressivePolicy",
    "ChainPolicy",
    "StaticTreePolicy",
    "DynamicTreePolicy",
    "SagePolicy",
    "SPECVLM_TREE_PATHS",
]
