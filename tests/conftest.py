import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct, fp32 on the CPU (or CUDA when present)."""
    from koala.loading import load_target
    return load_target("smollm2-135m-instruct", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    """The transformers reference model built from the same weights."""
    from transformers import AutoModelForCausalLM
    from koala.loading import _gguf_to_cache, default_gguf_path
    path = _gguf_to_cache(default_gguf_path())
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
