"""Perplexity under one fixed protocol (see ghosted/data.py for the windowing).

Protocol: the text source is cut into non-overlapping windows of `seq_len` tokens (BOS first when
the tokenizer adds one); every next-token prediction inside a window is scored (T - 1 per window);
PPL = exp(mean NLL over all scored tokens). `windows` limits how many windows (from the start of
the source, in document order) are used, so results are comparable across runs and models.

Memory: the loss never holds a batch's full logits [B, T, vocab]. The decoder gives the final hidden
states [B, T, d]; the LM head runs on `chunk_rows` tokens at a time (LOGIT_CHUNK_BYTES of float32 logits),
so the loss costs B T d b (the hidden states) + 2 R V 4 bytes (one chunk's logits and its log-softmax),
R = chunk_rows(V), instead of 3 B T V 4. Families whose head post-processing is not in HEAD_POST run the
plain forward (full logits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ghosted.corpora import load_documents, make_windows, tokens_sha256
from ghosted.errors import GhostedError

# Float32 logits of one chunk of tokens (SmolLM2, vocab 49152: 170 rows; Llama 3, 128256: 65 rows).
LOGIT_CHUNK_BYTES = 32 * 2**20
MAX_CHUNK_ROWS = 1024
MIN_CHUNK_ROWS = 64


def _softcap(config, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _granite(config, logits: torch.Tensor) -> torch.Tensor:
    return logits / config.logits_scaling


def _identity(config, logits: torch.Tensor) -> torch.Tensor:
    return logits


# CausalLM classes (transformers) whose forward is exactly `post(lm_head(base_model(...).last_hidden_state))`,
# with `post` the elementwise map here, in the model's dtype as their forward applies it. Checked against
# the plain forward for every family by tests/test_perplexity.py; any other class runs the plain forward.
HEAD_POST: dict[str, Callable[[object, torch.Tensor], torch.Tensor]] = {
    **dict.fromkeys(("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "OlmoForCausalLM", "Olmo2ForCausalLM", "Phi3ForCausalLM", "GPT2LMHeadModel",
                     "SmolLM3ForCausalLM"), _identity),
    "Gemma2ForCausalLM": _softcap,
    "Gemma3ForCausalLM": _softcap,
    "GraniteForCausalLM": _granite,
}


def chunk_rows(vocab: int) -> int:
    """Tokens per LM-head chunk: LOGIT_CHUNK_BYTES of float32 logits, within [MIN_CHUNK_ROWS, MAX_CHUNK_ROWS]."""
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, LOGIT_CHUNK_BYTES // (4 * max(int(vocab), 1))))


def split_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, Callable] | None:
    """(decoder, LM head, post-processing) when `model`'s forward is one of HEAD_POST's, else None.

    The class must run that transformers class's own forward (a subclass that only adds hooks, like a ghost
    checkpoint's GhostedForCausalLM, qualifies; one that overrides forward does not)."""
    for cls in type(model).__mro__:
        post = HEAD_POST.get(cls.__name__)
        if post is None or not cls.__module__.startswith("transformers."):
            continue
        if type(model).forward is not cls.forward:
            return None
        decoder, head = getattr(model, "base_model", None), model.get_output_embeddings()
        if decoder is None or decoder is model or head is None:
            return None
        return decoder, head, post
    return None


def next_token_logits(model: torch.nn.Module, ids: torch.Tensor,
                      split: tuple | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 logits [R, V], targets [R]) for every next-token prediction of windows `ids` [B, T], R tokens
    at a time (row-major over (window, position)); the same values as `model(ids).logits[:, :-1].float()`."""
    split = split_head(model) if split is None else split
    targets = ids[:, 1:].reshape(-1)
    if split is None:  # plain forward: full logits of the batch
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        yield logits.reshape(-1, logits.shape[-1]), targets
        return
    decoder, head, post = split
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [B (T-1), d]
    rows = chunk_rows(head.weight.shape[0] if hasattr(head, "weight") else model.config.vocab_size)
    for r in range(0, hidden.shape[0], rows):
        yield post(model.config, head(hidden[r:r + rows])).float(), targets[r:r + rows]


def nll_sum(model: torch.nn.Module, ids: torch.Tensor, split: tuple | None = None) -> float:
    """Sum of next-token negative log-likelihoods of windows `ids` [B, T] (float64), one logits chunk at a time."""
    total = 0.0
    for logits, targets in next_token_logits(model, ids, split):
        # the head may sit on another device than the embeddings (a model split over GPUs)
        nll = F.cross_entropy(logits, targets.to(logits.device), reduction="none").double().sum()
        del logits  # the chunk's logits go before the next chunk's are made
        if not torch.isfinite(nll):
            raise GhostedError("the model produced non-finite logits (fp16 overflow?): evaluate in float32 or bfloat16")
        total += float(nll)
    return total


@torch.no_grad()
def mean_nll(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = False,
             desc: str = "loss") -> float:
    """Mean next-token negative log-likelihood over windows [N, T] (float64 accumulation)."""
    device = next(model.parameters()).device
    split = split_head(model)
    total, count = 0.0, 0
    for start in tqdm(range(0, input_ids.shape[0], batch_size), desc=desc, disable=not progress, unit="batch"):
        ids = input_ids[start:start + batch_size].to(device)
        total += nll_sum(model, ids, split)
        count += ids[:, 1:].numel()
    return total / max(count, 1)


def perplexity(model: torch.nn.Module, tokenizer, source: str, seq_len: int = 512, windows: int | None = 32,
               batch_size: int = 4, progress: bool = True) -> dict:
    """PPL of `model` on a text source under the protocol above."""
    from ghosted.checks import check_seq_len

    if windows is not None and windows < 1:
        raise GhostedError(f"--ppl-windows must be >= 1, got {windows}")
    check_seq_len(model.config, seq_len)
    ids = make_windows(tokenizer, load_documents(source), seq_len)
    if windows is not None:
        ids = ids[:windows]
    nll = mean_nll(model, ids, batch_size, progress, desc=f"ppl {source}")
    return {"ppl": math.exp(nll), "nll": nll, "windows": int(ids.shape[0]), "seq_len": seq_len,
            "tokens_scored": int(ids.shape[0] * (ids.shape[1] - 1)),
            "sha256": tokens_sha256(ids)}  # the exact windows scored, as for calibration
