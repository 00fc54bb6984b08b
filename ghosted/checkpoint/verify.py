"""Check a checkpoint folder before anything loads it: manifest hashes, code files, layer count, ghost sites
and shapes, finite values."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ghosted.checkpoint.card import is_inert
from ghosted.checkpoint.format import (
    AUTO_MAP,
    FORMAT,
    MANIFEST,
    MODEL_CLASS,
    MODEL_TYPE,
    VARIANT,
    _listed_files,
    base_config,
    remote_sources,
)
from ghosted.checkpoint.meta import ABSENT, CheckpointMeta, read_config
from ghosted.errors import GhostedError
from ghosted.io import file_sha256
from ghosted.method import arch


def _upgrade_hint(path: Path) -> str:
    return f"rewrite it with `ghosted upgrade {path}`"


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    name = f"model.{variant}.safetensors" if variant else "model.safetensors"
    index = folder / (f"model.safetensors.index.{variant}.json" if variant else "model.safetensors.index.json")
    if (folder / name).is_file():
        return [folder / name]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    raise GhostedError(f"{folder}: no {name} (or its index): the weights are missing")


def _is_legacy(doc: dict) -> bool:
    return doc["ghosted"].get("format") is None


def _check_manifest(folder: Path) -> list[str]:
    """Every file the manifest lists is there with its sha256, and nothing a loader reads is unlisted. Files no
    loader reads (card.is_inert: README.md, .gitattributes, LICENSE, images) may be added, edited or removed;
    returns those that differ from the manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GhostedError(f"{folder}: no {MANIFEST}, so its files cannot be checked; if you wrote it with "
                           f"ghosted, {_upgrade_hint(folder)}") from None
    except ValueError as exc:
        raise GhostedError(f"{folder}/{MANIFEST} is not valid JSON ({exc})") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("algorithm") != "sha256" or not isinstance(files, dict) or not files:
        raise GhostedError(f"{folder}/{MANIFEST}: no sha256 file list")
    present = set(_listed_files(folder))
    changed: list[str] = []
    for name, digest in files.items():
        if is_inert(name):
            if name not in present or file_sha256(folder / name) != digest:
                changed.append(name)
        elif name not in present:
            raise GhostedError(f"{folder}: {name} is listed in the manifest but missing")
        elif file_sha256(folder / name) != digest:
            raise GhostedError(f"{folder}: {name} was modified after it was written (sha256 differs from the manifest)")
    extra = sorted(present - set(files))
    refused = [name for name in extra if not is_inert(name)]
    if refused:
        raise GhostedError(f"{folder}: file(s) not in the manifest: {', '.join(refused)} (only files no loader "
                           "reads, such as README.md or .gitattributes, may be added)")
    return sorted(changed + extra)


def _code_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.py"))


def _stale_code(folder: Path, expected: dict[str, str]) -> list[str]:
    """The expected code files whose text is not what this ghosted writes."""
    return [name for name, text in expected.items() if (folder / name).read_text(encoding="utf-8") != text]


def _check_code(folder: Path, doc: dict, base: str, has_ghosts: bool) -> None:
    code = _code_files(folder)
    for tok_cfg in ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        f = folder / tok_cfg
        if f.is_file() and "auto_map" in json.loads(f.read_text(encoding="utf-8")):
            raise GhostedError(f"{folder}: {tok_cfg} maps classes to code (auto_map): ghosted never writes that")
    if not has_ghosts:
        if code or doc.get("auto_map"):
            raise GhostedError(f"{folder}: a checkpoint without ghosts must hold no code, found "
                               f"{', '.join(code) or 'an auto_map'}")
        return
    if doc.get("model_type") != MODEL_TYPE or doc.get("architectures") != [MODEL_CLASS]:
        raise GhostedError(f"{folder}: a ghost checkpoint must say model_type {MODEL_TYPE!r} and architectures "
                           f"[{MODEL_CLASS!r}], found {doc.get('model_type')!r} and {doc.get('architectures')!r}")
    if doc.get("auto_map") != AUTO_MAP:
        raise GhostedError(f"{folder}: config.json auto_map {doc.get('auto_map')!r} is not ghosted's {AUTO_MAP!r}")
    expected = remote_sources(base)
    if code != sorted(expected):
        raise GhostedError(f"{folder}: code files {code} differ from ghosted's {sorted(expected)}")
    stale = _stale_code(folder, expected)
    if stale:
        raise GhostedError(f"{folder}: {stale[0]} is not the code this ghosted writes (modified, or from another "
                           f"version: {_upgrade_hint(folder)})")


def _check_tensors(folder: Path, doc: dict, meta: CheckpointMeta, base: str, has_ghosts: bool) -> None:
    from safetensors import safe_open

    config = base_config(doc, base)
    spec = arch.get_arch(config)
    n = getattr(config, spec.num_layers_key)
    d = config.get_text_config().hidden_size
    if meta.num_layers not in (None, ABSENT) and meta.num_layers != n:
        raise GhostedError(f"{folder}: config says {n} layers ({spec.num_layers_key}) but the ghosted block says "
                           f"{meta.num_layers}")
    layer_re = re.compile(rf"^(?:model\.)?{re.escape(spec.layers.removeprefix('model.'))}\.(\d+)\.")
    layers: set[int] = set()
    ghosts: dict[str, tuple[int, ...]] = {}
    for f in _weight_files(folder, VARIANT if has_ghosts else None):
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    t = st.get_tensor(key)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise GhostedError(f"{folder}: tensor {key} has non-finite values (nan/inf)")
                    m = layer_re.match(key)
                    if m:
                        layers.add(int(m[1]))
                    elif key.startswith("ghosts."):
                        ghosts[key] = tuple(t.shape)
        except GhostedError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors' own errors: unreadable or truncated file
            raise GhostedError(f"{folder}: cannot read {f.name} ({' '.join(str(exc).split())})") from exc
    if layers != set(range(n)):
        raise GhostedError(f"{folder}: config says {n} layers but the weights hold layers "
                           f"{sorted(layers)[:3]}..{sorted(layers)[-3:]} ({len(layers)} in all)")
    want: dict[str, tuple[int, ...]] = {}
    sites = [g.get("site") for g in meta.ghost_list]
    if len(set(sites)) != len(sites):
        raise GhostedError(f"{folder}: ghost sites {sites} repeat")
    for g in meta.ghost_list:
        site, rank = g.get("site"), g.get("rank")
        if not isinstance(site, int) or not 0 <= site <= n:
            raise GhostedError(f"{folder}: ghost site {site!r} is out of range 0..{n}")
        if rank is None:
            want[f"ghosts.{site}.weight"] = (d, d)
        elif isinstance(rank, int) and 0 < rank <= d:
            want[f"ghosts.{site}.U"] = want[f"ghosts.{site}.V"] = (d, rank)
        else:
            raise GhostedError(f"{folder}: ghost rank {rank!r} at site {site} is not in 1..{d}")
        if g.get("bias"):
            want[f"ghosts.{site}.bias"] = (d,)
        if g.get("sink_shift"):
            want[f"ghosts.{site}.sink_shift"] = (d,)
        if g.get("detect"):
            want[f"ghosts.{site}.detect_weight"] = want[f"ghosts.{site}.detect_shift"] = (d,)
            want[f"ghosts.{site}.detect_bias"] = (1,)
        if g.get("norm"):
            if rank is not None:
                raise GhostedError(f"{folder}: the ghost at site {site} is low-rank and has norm features")
            want[f"ghosts.{site}.norm_weight"] = (d, d)
        if g.get("shift"):
            if rank is not None:
                raise GhostedError(f"{folder}: the ghost at site {site} is low-rank and has a token shift")
            want[f"ghosts.{site}.shift_weight"] = (d, d)
    for key, shape in want.items():
        if key not in ghosts:
            raise GhostedError(f"{folder}: ghost tensor {key} is missing from the weights")
        if ghosts[key] != shape:
            raise GhostedError(f"{folder}: ghost tensor {key} has shape {list(ghosts[key])}, expected {list(shape)}")
    extra = sorted(set(ghosts) - set(want))
    if extra:
        raise GhostedError(f"{folder}: ghost tensor(s) {', '.join(extra)} match no ghost in config.json")


def verify(path: str | Path) -> dict:
    """Check a checkpoint folder before anything loads it: manifest hashes, code, layer count, ghost sites and
    shapes, finite values. Returns a summary; raises GhostedError with the reason."""
    folder = Path(path)
    doc = read_config(folder)
    meta = CheckpointMeta.from_dict(doc["ghosted"])
    if meta.is_legacy:
        raise GhostedError(f"{folder} is in checkpoint format 1 of an older ghosted (no manifest; plain loaders read "
                           f"a ghost checkpoint of that format as its base model and drop the ghosts): "
                           f"{_upgrade_hint(folder)}")
    if meta.format != FORMAT:
        raise GhostedError(f"{folder}: checkpoint format {meta.format!r}; this ghosted reads format {FORMAT}")
    base = meta.base_architecture or None
    has_ghosts = meta.has_ghosts
    unread = _check_manifest(folder)
    _check_code(folder, doc, base, has_ghosts)
    _check_tensors(folder, doc, meta, base, has_ghosts)
    return {"path": str(folder), "ghosts": len(meta.ghost_list), "num_layers": meta.to_dict().get("num_layers"),
            "base_architecture": base, "kind": "ghost" if has_ghosts else "plain", "unchecked_files": unread}
