"""Save a pruned model as a normal Hugging Face folder; load it back with or without ghosts.

- No residual ghost (none, scalar, replaceme on foldable families): a standard checkpoint of the
  base architecture with fewer layers; `AutoModelForCausalLM.from_pretrained(dir)` loads it.
- With ghosts: the same, plus `ghosts.<site>.*` tensors in the safetensors, `modeling_ghosted.py`
  in the folder and an `auto_map`, so `from_pretrained(dir, trust_remote_code=True)` loads it;
  `ghosted.load(dir)` loads it without executing the folder's code.
Both carry a `ghosted` block in config.json with the lineage.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

from . import arch
from ._remote import modeling_ghosted
from .errors import GhostedError

REMOTE_FILE = "modeling_ghosted.py"


def _remote_source(base_cls: str) -> str:
    src = resources.files("ghosted._remote").joinpath(REMOTE_FILE).read_text(encoding="utf-8")
    return src + (
        f"\n\nfrom transformers import {base_cls} as _Base  # noqa: E402\n\n\n"
        f"class Ghosted{base_cls}(GhostedMixin, _Base):\n"
        f"    \"\"\"{base_cls} with ghost operators at the pruned boundaries.\"\"\"\n"
    )


def save(model: torch.nn.Module, tokenizer, out_dir: str | Path, meta: dict) -> Path:
    """Write the checkpoint to a temp folder beside out_dir, then rename: never half-written."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    cfg = model.config
    spec = arch.get_arch(model)
    has_ghosts = bool(meta.get("ghosts"))
    base_cls = meta["base_architecture"]
    saved_arch = getattr(cfg, "architectures", None)
    try:
        block = dict(meta)
        block["layers_path"] = spec.layers
        block["final_norm_path"] = spec.final_norm
        cfg.ghosted = block
        if has_ghosts:
            cfg.auto_map = {"AutoModelForCausalLM": f"{REMOTE_FILE[:-3]}.Ghosted{base_cls}"}
            cfg.architectures = [f"Ghosted{base_cls}"]
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if has_ghosts:
            (tmp / REMOTE_FILE).write_text(_remote_source(base_cls), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        cfg.architectures = saved_arch
        if hasattr(cfg, "auto_map") and has_ghosts:
            del cfg.auto_map
    return out


def read_meta(path: str | Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        raise GhostedError(f"{path} has no config.json")
    return json.loads(cfg.read_text()).get("ghosted", {})


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None) -> torch.nn.Module:
    """Load a ghosted checkpoint with this package's own ghost code (no trust_remote_code needed)."""
    import transformers

    meta = read_meta(path)
    base = meta.get("base_architecture")
    if not base or not hasattr(transformers, base):
        raise GhostedError(f"{path}: not a ghosted checkpoint, or its base architecture {base!r} is unknown")
    base_cls = getattr(transformers, base)
    cls = type(f"Ghosted{base}", (modeling_ghosted.GhostedMixin, base_cls), {})
    model = cls.from_pretrained(str(path), dtype=dtype)
    if device:
        model.to(device)
    model.eval()
    return model
