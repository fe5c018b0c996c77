"""Shared fixtures: tiny random-initialised models of several families, built from configs (no hub)."""

from __future__ import annotations

import fedspallm  # noqa: F401  (first: sets the OpenMP wait policy before torch loads; see its __init__)

import pytest
import torch

FAMILIES = ("llama", "opt", "mistral", "qwen2", "gpt2")


def make_tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import (
        AutoModelForCausalLM,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=128, num_hidden_layers=3, max_position_embeddings=64)
    if family == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **common)
    elif family == "mistral":
        config = MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **common)
    elif family == "qwen2":
        config = Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **common)
    elif family == "opt":
        config = OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64, **common)
    elif family == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=128, n_positions=64)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model


@pytest.fixture(params=FAMILIES)
def tiny_model(request) -> torch.nn.Module:
    return make_tiny_model(request.param)


def random_windows(n: int = 6, seqlen: int = 16, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=generator)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random Llama with the embedded model's tokenizer, saved as a local HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from fedspallm.assets import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
