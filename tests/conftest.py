"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402  (after the device flags)


@pytest.fixture(scope="session")
def primed_tiny(tmp_path_factory) -> str:
    """A Hugging Face directory of tiny random weights (seed 7) sized to the embedded tokenizer:
    a stand-in for a trained stage's export, other than `random:tiny`'s (seed 0) weights."""
    from qalign_jax.models import hf, llama, load

    out = str(tmp_path_factory.mktemp("primed_tiny"))
    cfg, _ = load.describe("random:tiny", tokenizer_source="embedded")
    hf.export_hf(out, cfg, llama.init_params(cfg, seed=7))
    return out
