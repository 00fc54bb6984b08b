"""Tiny random models of every supported family, plus a tiny offline tokenizer, for fast exact tests.

All families share one vocabulary layout (128 ids; <pad>=0, <bos>=1, <eos>=2, <unk>=3) so the tokenizer
from `make_tiny_tokenizer()` fits every model.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    OlmoConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)

VOCAB_SIZE = 128
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
MAX_POSITIONS = 64
# Sliding windows shorter than a prompt plus a few generated tokens, so sliding masks and caches are exercised.
SLIDING_WINDOW = 4
# Larger than the usual 0.02 so every layer visibly changes the logits (removal must matter in the tests).
INIT_RANGE = 0.2

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "max_position_embeddings": MAX_POSITIONS,
    "initializer_range": INIT_RANGE,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}


def _alternating(num_layers: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]


def _llama(n: int) -> PretrainedConfig:
    return LlamaConfig(**_COMMON, num_hidden_layers=n)


def _mistral(n: int) -> PretrainedConfig:
    return MistralConfig(**_COMMON, num_hidden_layers=n, sliding_window=SLIDING_WINDOW)


def _qwen2(n: int) -> PretrainedConfig:
    # The upper half of the layers slides: layer_types mixes both kinds.
    return Qwen2Config(
        **_COMMON, num_hidden_layers=n, use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=n // 2
    )


def _qwen3(n: int) -> PretrainedConfig:
    return Qwen3Config(
        **_COMMON,
        num_hidden_layers=n,
        head_dim=HEAD_DIM,
        use_sliding_window=True,
        sliding_window=SLIDING_WINDOW,
        max_window_layers=n // 2,
    )


def _gemma3_text(n: int) -> PretrainedConfig:
    return Gemma3TextConfig(
        **_COMMON,
        num_hidden_layers=n,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        sliding_window=SLIDING_WINDOW,
        layer_types=_alternating(n),
    )


def _gemma2(n: int) -> PretrainedConfig:
    return Gemma2Config(
        **_COMMON,
        num_hidden_layers=n,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        sliding_window=SLIDING_WINDOW,
        layer_types=_alternating(n),
    )


def _olmo(n: int) -> PretrainedConfig:
    return OlmoConfig(**_COMMON, num_hidden_layers=n)


def _olmo2(n: int) -> PretrainedConfig:
    return Olmo2Config(**_COMMON, num_hidden_layers=n)


def _phi3(n: int) -> PretrainedConfig:
    return Phi3Config(**_COMMON, num_hidden_layers=n, original_max_position_embeddings=MAX_POSITIONS)


def _gpt2(n: int) -> PretrainedConfig:
    return GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=HIDDEN,
        n_layer=n,
        n_head=HEADS,
        n_inner=2 * HIDDEN,
        n_positions=MAX_POSITIONS,
        initializer_range=INIT_RANGE,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def _granite(n: int) -> PretrainedConfig:
    # Non-trivial multipliers: the residual multiplier is what makes Granite's fold inexact.
    return GraniteConfig(
        **_COMMON,
        num_hidden_layers=n,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.25,
        logits_scaling=2.0,
    )


def _smollm3(n: int) -> PretrainedConfig:
    # Every second layer without RoPE: no_rope_layers is a per-layer list that must follow the layers.
    return SmolLM3Config(**_COMMON, num_hidden_layers=n, no_rope_layer_interval=2)


_BUILDERS: dict[str, Callable[[int], PretrainedConfig]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma3_text": _gemma3_text,
    "olmo2": _olmo2,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "gemma2": _gemma2,
    "olmo": _olmo,
    "granite": _granite,
    "smollm3": _smollm3,
}

FAMILIES: list[str] = list(_BUILDERS)


def tiny_config(family: str, num_layers: int = 4) -> PretrainedConfig:
    """The tiny config of `family` (one of FAMILIES)."""
    if family not in _BUILDERS:
        raise KeyError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")
    return _BUILDERS[family](num_layers)


def make_tiny(
    family: str, seed: int = 0, num_layers: int = 4
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast | None]:
    """A tiny random float32 model of `family` in eval mode, identical for the same seed, and the tiny tokenizer."""
    config = tiny_config(family, num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model, make_tiny_tokenizer()


_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A ghost layer replaces removed blocks with one linear map.",
    "Layer pruning removes whole decoder layers from a language model.",
    "The residual stream carries the hidden state from layer to layer.",
    "Calibration data gives the statistics for least squares.",
    "Small models train fast, and tiny tests run faster still.",
    "Paris is the capital of France; Rome is the capital of Italy.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
]


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE tokenizer with VOCAB_SIZE ids trained in memory (offline); adds <bos> in front of every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0..3, in the order of PAD_ID, BOS_ID, EOS_ID, UNK_ID
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=list(string.ascii_letters + string.digits + ".,;:!?'-()"),
        show_progress=False,
    )
    tok.train_from_iterator(_SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_POSITIONS,
    )


def save_tiny_folder(path: Path, num_layers: int = 6) -> Path:
    """A tiny random Llama folder (weights + tokenizer) whose context fits lm-eval's longest PIQA items."""
    config = tiny_config("llama", num_layers)
    config.max_position_embeddings = 1024  # the tiny BPE spells words out: PIQA solutions run past 64 tokens
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path
