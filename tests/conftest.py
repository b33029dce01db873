"""pytest configuration shared by the test suite.

Makes the helper modules in tests/ (e.g. `ops_helpers`) importable whatever pytest's import mode,
and registers the hypothesis profiles: "default" keeps the op suite within a few minutes on two
cores, "thorough" (HYPOTHESIS_PROFILE=thorough) runs ten times as many examples.
"""
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

settings.register_profile(
    "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=250, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def inference_mode():
    """Run a test under torch.inference_mode, as the engine runs the family adapters (they set no grad mode
    themselves). Modules use it with ``pytestmark = pytest.mark.usefixtures("inference_mode")``."""
    with torch.inference_mode():
        yield
