"""Perplexity under one fixed protocol (see ghosted/data.py for the windowing).

Protocol: the text source is cut into non-overlapping windows of `seq_len` tokens (BOS first when
the tokenizer adds one); every next-token prediction inside a window is scored (T - 1 per window);
PPL = exp(mean NLL over all scored tokens). `windows` limits how many windows (from the start of
the source, in document order) are used, so results are comparable across runs and models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import load_documents, make_windows, tokens_sha256
from ..errors import GhostedError


@torch.no_grad()
def mean_nll(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = False,
             desc: str = "loss") -> float:
    """Mean next-token negative log-likelihood over windows [N, T] (float64 accumulation)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, input_ids.shape[0], batch_size), desc=desc, disable=not progress, unit="batch"):
        ids = input_ids[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        if not torch.isfinite(nll):
            raise GhostedError("the model produced non-finite logits (fp16 overflow?): evaluate in float32 or bfloat16")
        total += float(nll.double())
        count += ids[:, 1:].numel()
    return total / max(count, 1)


def perplexity(model: torch.nn.Module, tokenizer, source: str, seq_len: int = 512, windows: int | None = 32,
               batch_size: int = 4, progress: bool = True) -> dict:
    """PPL of `model` on a text source under the protocol above."""
    from ..checks import check_seq_len

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
