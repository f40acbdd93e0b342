import os
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
from sd_lora.data import make_demo_data


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    "The demo imagefolder, written once per test session."
    return make_demo_data(tmp_path_factory.mktemp("demo_data"))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    "Each test trains as a fresh process would: accelerate's process-wide state (precision, device) starts unset."
    from sd_lora.run import forget_accelerate_state
    forget_accelerate_state()

