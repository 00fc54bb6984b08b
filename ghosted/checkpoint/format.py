"""Save a pruned model as a Hugging Face folder; verify it; load it back with or without ghosts.

- No residual ghost (none, scalar, replaceme on foldable families): a standard checkpoint of the
  base architecture with fewer layers; `AutoModelForCausalLM.from_pretrained(dir)` loads it.
- With ghosts: its own model type. config.json says `model_type: ghosted`,
  `architectures: [GhostedForCausalLM]` and maps AutoConfig / AutoModelForCausalLM to
  `configuration_ghosted.py` / `modeling_ghosted.py` in the folder; the weights (ghosts.<site>.*
  included) are `model.ghosted.safetensors`. So `from_pretrained(dir, trust_remote_code=True)` runs
  the ghosts, `ghosted.load(dir)` runs them with this package's code, and every loader that does
  not run the code refuses the folder (AutoModel: unknown model type; the base class: no
  model.safetensors) instead of silently dropping the ghosts.
Both carry a `ghosted` block in config.json with the lineage, and `ghosted_manifest.json` with the
sha256 of every file; `verify` checks it and the tensors before anything is loaded.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from pathlib import Path

import torch

from ghosted._remote import modeling_ghosted
from ghosted.errors import GhostedError
from ghosted.io import MARKER, atomic_dir, file_sha256
from ghosted.method import arch

FORMAT = 2  # 1: older ghosted (model_type of the base, weights in model.safetensors, no manifest)
MODEL_TYPE = "ghosted"
MODEL_CLASS = "GhostedForCausalLM"
CONFIG_CLASS = "GhostedConfig"
MODELING_FILE = "modeling_ghosted.py"
CONFIG_FILE = "configuration_ghosted.py"
MANIFEST = "ghosted_manifest.json"
VARIANT = modeling_ghosted.WEIGHTS_VARIANT
AUTO_MAP = {"AutoConfig": f"{CONFIG_FILE[:-3]}.{CONFIG_CLASS}",
            "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{MODEL_CLASS}"}
_GHOST_TENSOR = re.compile(r"^ghosts\.(\d+)\.(weight|U|V|bias|sink_shift|norm_weight|shift_weight)$")


def _base_classes(base: str) -> tuple[type, type]:
    """The transformers *ForCausalLM class named `base` and its config class."""
    import transformers

    model_cls = getattr(transformers, str(base), None) if base else None
    if model_cls is None or not hasattr(model_cls, "config_class"):
        raise GhostedError(f"unknown base architecture {base!r}: this transformers ({transformers.__version__}) "
                           "has no such model class")
    return model_cls, model_cls.config_class


def remote_sources(base: str) -> dict[str, str]:
    """The code files of a ghost checkpoint over `base`, exactly as this version writes them."""
    model_cls, config_cls = _base_classes(base)
    modeling = resources.files("ghosted._remote").joinpath(MODELING_FILE).read_text(encoding="utf-8")
    modeling += (
        f"\n\nfrom transformers import {model_cls.__name__} as _Base  # noqa: E402\n\n"
        f"from .{CONFIG_FILE[:-3]} import {CONFIG_CLASS}  # noqa: E402\n\n\n"
        f"class {MODEL_CLASS}(GhostedMixin, _Base):\n"
        f"    \"\"\"{model_cls.__name__} with ghost operators at the pruned boundaries.\"\"\"\n\n"
        f"    config_class = {CONFIG_CLASS}\n"
    )
    configuration = (
        "# Config of a ghosted checkpoint: the base architecture's config under its own model type, so that a\n"
        "# loader that does not run this folder's code refuses it instead of loading the base model without\n"
        "# its ghosts. Written by ghosted; `ghosted verify DIR` checks it.\n"
        f"from transformers import {config_cls.__name__} as _BaseConfig\n\n\n"
        f"class {CONFIG_CLASS}(_BaseConfig):\n"
        f"    \"\"\"{config_cls.__name__} of a layer-pruned model with ghost operators.\"\"\"\n\n"
        f"    model_type = \"{MODEL_TYPE}\"\n"
    )
    return {MODELING_FILE: modeling, CONFIG_FILE: configuration}


@cache
def ghost_classes(base: str) -> tuple[type, type]:
    """(GhostedConfig, GhostedForCausalLM) over `base`, from this package's code (never the folder's)."""
    model_cls, config_cls = _base_classes(base)
    cfg = type(CONFIG_CLASS, (config_cls,), {"model_type": MODEL_TYPE, "__module__": __name__})
    model = type(MODEL_CLASS, (modeling_ghosted.GhostedMixin, model_cls),
                 {"config_class": cfg, "__module__": __name__})
    return cfg, model



def _listed_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, MARKER))


def write_manifest(folder: Path) -> dict:
    """ghosted_manifest.json: the sha256 of every file in the folder (but itself and the output marker)."""
    from ghosted.version import __version__

    doc = {"ghosted": __version__, "format": FORMAT, "algorithm": "sha256",
           "files": {name: file_sha256(folder / name) for name in _listed_files(folder)}}
    (folder / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return doc


def _check_finite(model: torch.nn.Module, chunk: int = 1 << 20) -> None:
    # chunk by chunk: torch.isfinite of a whole tensor makes an |x| copy and a mask of it (the embedding of
    # SmolLM2: 113 + 28 MiB, the save's peak before)
    for name, t in model.state_dict().items():
        flat = t.reshape(-1) if t.is_floating_point() else t.new_empty(0)
        if not all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk)):
            raise GhostedError(f"not saving: tensor {name} has non-finite values (nan/inf); the fit or the model "
                               "is broken, try a larger --ridge or float32")


def save(model: torch.nn.Module, tokenizer, out_dir: str | Path, meta: dict, force: bool = False) -> Path:
    """Write the checkpoint atomically (see io.atomic_dir): never half-written, a user's folder never replaced."""
    out = Path(out_dir)
    cfg = model.config
    has_ghosts = bool(meta.get("ghosts"))
    base = meta["base_architecture"]
    if has_ghosts:
        remote = remote_sources(base)  # an unknown base fails here, before anything is written
    _check_finite(model)
    block = {**meta, "format": FORMAT}
    if "layers_path" not in block:
        spec = arch.get_arch(model)
        block["layers_path"], block["final_norm_path"] = spec.layers, spec.final_norm
    saved = {k: getattr(cfg, k) for k in ("ghosted", "auto_map") if hasattr(cfg, k)}
    with atomic_dir(out, force=force, kind="checkpoint") as tmp:
        try:
            cfg.ghosted = block
            if hasattr(cfg, "auto_map"):
                del cfg.auto_map
            model.save_pretrained(tmp, variant=VARIANT if has_ghosts else None)
        finally:
            for k in ("ghosted", "auto_map"):
                if k in saved:
                    setattr(cfg, k, saved[k])
                elif hasattr(cfg, k):
                    delattr(cfg, k)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        doc = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        if has_ghosts:
            for name, text in remote.items():
                (tmp / name).write_text(text, encoding="utf-8")
            # save_pretrained writes the in-memory class's name and type; the folder must name its own.
            doc.update(model_type=MODEL_TYPE, architectures=[MODEL_CLASS], auto_map=dict(AUTO_MAP))
        else:
            doc["architectures"] = [base]
            doc.pop("auto_map", None)
        (tmp / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_manifest(tmp)
    return out


def read_meta(path: str | Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        raise GhostedError(f"{path} has no config.json")
    try:
        return json.loads(cfg.read_text()).get("ghosted", {})
    except (ValueError, AttributeError) as exc:
        raise GhostedError(f"{path}/config.json is not a JSON object: {exc}") from exc


# --------------------------------------------------------------------------- verification


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


def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise GhostedError(f"{folder} is not a folder")
    try:
        doc = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GhostedError(f"{folder} has no config.json: not a model folder") from None
    except ValueError as exc:
        raise GhostedError(f"{folder}/config.json is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("ghosted"), dict):
        raise GhostedError(f"{folder} is not a ghosted checkpoint (config.json has no `ghosted` block)")
    return doc


def _is_legacy(doc: dict) -> bool:
    return doc["ghosted"].get("format") is None


def _check_manifest(folder: Path) -> None:
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
    for name, digest in files.items():
        if name not in present:
            raise GhostedError(f"{folder}: {name} is listed in the manifest but missing")
        if file_sha256(folder / name) != digest:
            raise GhostedError(f"{folder}: {name} was modified after it was written (sha256 differs from the manifest)")
    extra = sorted(present - set(files))
    if extra:
        raise GhostedError(f"{folder}: file(s) not in the manifest: {', '.join(extra)}")


def _base_config(doc: dict, base: str):
    _, config_cls = _base_classes(base)
    skip = ("model_type", "auto_map", "architectures", "transformers_version")
    body = {k: v for k, v in doc.items() if k not in skip}
    try:
        return config_cls.from_dict(body)
    except Exception as exc:  # noqa: BLE001 - a config transformers rejects is a broken checkpoint
        why = " ".join(str(exc).split())
        raise GhostedError(f"config.json does not make a valid {config_cls.__name__}: {why}") from exc


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


def _check_tensors(folder: Path, doc: dict, meta: dict, base: str, has_ghosts: bool) -> None:
    from safetensors import safe_open

    config = _base_config(doc, base)
    spec = arch.get_arch(config)
    n = getattr(config, spec.num_layers_key)
    d = config.get_text_config().hidden_size
    if meta.get("num_layers") is not None and meta["num_layers"] != n:
        raise GhostedError(f"{folder}: config says {n} layers ({spec.num_layers_key}) but the ghosted block says "
                           f"{meta['num_layers']}")
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
    sites = [g.get("site") for g in meta.get("ghosts") or []]
    if len(set(sites)) != len(sites):
        raise GhostedError(f"{folder}: ghost sites {sites} repeat")
    for g in meta.get("ghosts") or []:
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
    doc = _read_config(folder)
    meta = doc["ghosted"]
    if _is_legacy(doc):
        raise GhostedError(f"{folder} is in checkpoint format 1 of an older ghosted (no manifest; plain loaders read "
                           f"a ghost checkpoint of that format as its base model and drop the ghosts): "
                           f"{_upgrade_hint(folder)}")
    if meta.get("format") != FORMAT:
        raise GhostedError(f"{folder}: checkpoint format {meta.get('format')!r}; this ghosted reads format {FORMAT}")
    base = meta.get("base_architecture")
    has_ghosts = bool(meta.get("ghosts"))
    _check_manifest(folder)
    _check_code(folder, doc, base, has_ghosts)
    _check_tensors(folder, doc, meta, base, has_ghosts)
    return {"path": str(folder), "ghosts": len(meta.get("ghosts") or []), "num_layers": meta.get("num_layers"),
            "base_architecture": base, "kind": "ghost" if has_ghosts else "plain"}


# --------------------------------------------------------------------------- loading


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None) -> torch.nn.Module:
    """Verify, then load a ghosted checkpoint with this package's own ghost code (the folder's code never runs)."""
    verify(path)
    meta = read_meta(path)
    if meta.get("ghosts"):
        cfg_cls, model_cls = ghost_classes(meta["base_architecture"])
        model = model_cls.from_pretrained(str(path), config=cfg_cls.from_pretrained(str(path)), dtype=dtype)
    else:
        model_cls, _ = _base_classes(meta["base_architecture"])
        model = model_cls.from_pretrained(str(path), dtype=dtype)
    if device:
        model.to(device)
    model.eval()
    return model


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, resolved with the base config (AutoTokenizer alone would ask to run the code)."""
    from transformers import AutoTokenizer

    doc = _read_config(Path(path))
    return AutoTokenizer.from_pretrained(str(path), config=_base_config(doc, doc["ghosted"].get("base_architecture")))


def _load_legacy(folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A format-1 checkpoint (base model type, weights in model.safetensors), with this package's ghost code."""
    meta = read_meta(folder)
    model_cls, config_cls = _base_classes(meta.get("base_architecture"))
    config = config_cls.from_pretrained(str(folder))
    for attr in ("auto_map",):
        if hasattr(config, attr):
            delattr(config, attr)
    cls = type(MODEL_CLASS, (modeling_ghosted.GhostedMixin, model_cls), {"__module__": __name__})
    return cls.from_pretrained(str(folder), config=config, dtype=dtype, variant=None).eval()


def _older_code(folder: Path, doc: dict, meta: dict) -> bool:
    """A ghost checkpoint in the current format whose code files are this package's files in name but not in
    text: written by another ghosted version."""
    if meta.get("format") != FORMAT or not meta.get("ghosts"):
        return False
    if doc.get("model_type") != MODEL_TYPE or doc.get("auto_map") != AUTO_MAP:
        return False
    try:
        expected = remote_sources(meta.get("base_architecture"))
    except GhostedError:
        return False
    return _code_files(folder) == sorted(expected) and bool(_stale_code(folder, expected))


def upgrade(path: str | Path) -> dict:
    """Rewrite a checkpoint of an older format (or without a manifest) in the current format, in place.

    Only this package's code reads the old folder, so upgrading never runs the folder's code. A folder with a
    manifest is rewritten only when its files are exactly what its manifest lists and its code files are another
    ghosted version's (an intact checkpoint written before the ghost code changed); otherwise it is verified, and
    a failing one is refused, never rewritten."""
    folder = Path(path)
    doc = _read_config(folder)
    meta = dict(doc["ghosted"])
    if not _is_legacy(doc):
        if (folder / MANIFEST).exists():
            # Never re-bless a folder whose own manifest disagrees with it: that is what tampering looks like.
            _check_manifest(folder)
            if not _older_code(folder, doc, meta):
                return {**verify(folder), "upgraded": False}
        # Current format without a manifest (e.g. re-saved with save_pretrained): nothing contradicts it.
    has_ghosts = bool(meta.get("ghosts"))
    if _is_legacy(doc):
        model = _load_legacy(folder)
    elif has_ghosts:
        cfg_cls, model_cls = ghost_classes(meta["base_architecture"])
        model = model_cls.from_pretrained(str(folder), config=cfg_cls.from_pretrained(str(folder))).eval()
    else:
        model = _base_classes(meta["base_architecture"])[0].from_pretrained(str(folder)).eval()
    try:
        tokenizer = load_tokenizer(folder)
    except Exception:  # noqa: BLE001 - a checkpoint saved without a tokenizer stays without one
        tokenizer = None
    meta.pop("format", None)
    save(model, tokenizer, folder, meta, force=True)
    return {**verify(folder), "upgraded": True}
