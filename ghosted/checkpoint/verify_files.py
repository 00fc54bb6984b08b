"""The folder checks of checkpoint.verify: links and special files, the manifest's hashes, code files, and the files a
loader would read.

The manifest only tells an intact folder from an accidentally changed one: anyone can rewrite it. So the
structure is checked on its own too: no link leaves the folder, every file a loader would read is one ghosted
writes for this kind of checkpoint (no dense `model.safetensors` beside the ghost weights, no `*.bin`, no extra
code or config), and index entries name files in the folder (checkpoint.verify_tensors checks what they hold).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path, PurePosixPath

from ghosted.checkpoint.card import is_inert
from ghosted.checkpoint.format import (
    AUTO_MAP,
    FORMAT,
    MANIFEST,
    MODEL_CLASS,
    MODEL_TYPE,
    VARIANT,
    _listed_files,
    remote_sources,
)
from ghosted.errors import GhostedError
from ghosted.hashing import file_sha256
from ghosted.io_temps import MARKER
from ghosted.json_io import parse_json

MAX_INDEX = 64 << 20  # bytes of a weights index (a 400B model's is ~2 MB)
MAX_CONFIG = 16 << 20  # bytes of a config.json read to tell a checkpoint from a dense folder
# What a tokenizer's save_pretrained writes (and its loader reads); auto_map in tokenizer_config.json is refused.
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                             "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt",
                             "tokenizer.model", "spiece.model", "sentencepiece.bpe.model"})
_CHAT_TEMPLATES = "additional_chat_templates/"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".ggml", ".h5", ".msgpack", ".onnx",
                    ".npz", ".npy", ".pkl", ".pickle", ".joblib")
# Plain notes (NOTES.txt, train.log) are read by no loader; a vocabulary in a .txt file (vocab.txt, merges.txt) is.
_NOTE_SUFFIXES = (".txt", ".log")
_VOCAB_WORDS = ("vocab", "merges", "token", "dict", "bpe", "spm", "sentencepiece", "spiece")


def _upgrade_hint(path: Path) -> str:
    return f"rewrite it with `ghosted upgrade {path}`"


def read_by_loaders(name: str) -> bool:
    """Whether a loader (transformers and its tokenizers, ghosted.load, llama.cpp's converter, torch.load) may read
    this file of a checkpoint (path relative to it): all but documentation, licences, images (card.is_inert) and
    plain notes (*.txt, *.log that name no vocabulary)."""
    if is_inert(name):
        return False
    p = PurePosixPath(name)
    lower = p.name.lower()
    return not (p.suffix.lower() in _NOTE_SUFFIXES and not any(w in lower for w in _VOCAB_WORDS))



def _scan(folder: Path) -> dict[str, os.stat_result]:
    """{relative path: stat} of every file (a link to a file: its target's stat), before any file is read.

    Refused: a link that resolves outside the folder, a link to a file a loader reads (ghosted writes none: a link
    makes the manifest vouch for whatever it points to next), and anything that is not a file or folder (a FIFO
    or a device would hang or feed the hashing forever)."""
    root = folder.resolve()
    out: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in sorted(dirnames) + sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                target = path.resolve()
                if target != root and root not in target.parents:
                    raise GhostedError(f"{folder}: {rel} is a link to {target}, outside the folder: a loader would "
                                       "read a file the manifest cannot vouch for; replace the link with a copy of "
                                       "the file (e.g. `cp -rL`)")
                if read_by_loaders(rel):
                    raise GhostedError(f"{folder}: {rel} is a link (to {target.relative_to(root)}); ghosted writes "
                                       "no links, and a loader would read it: replace it with the file itself")
                if target.is_file():
                    out[rel] = target.stat()
            elif stat.S_ISREG(st.st_mode):
                out[rel] = st
            elif not stat.S_ISDIR(st.st_mode):
                raise GhostedError(f"{folder}: {rel} is not a regular file or folder (a FIFO, socket or device): "
                                   "remove it")
    return out


def _signature(files: dict[str, os.stat_result]) -> tuple:
    """What changes when any file is written, replaced, added or removed (ctime cannot be set back by a writer)."""
    return tuple((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
                 for rel, st in sorted(files.items()))


def _hash_files(folder: Path) -> tuple[dict[str, str], str]:
    """({relative path: sha256} of every file, the folder's content hash) in one read of each file; the content hash
    is exactly checkpoint.digest.checkpoint_sha256 (same files, same order, same framing)."""
    total = hashlib.sha256()
    each: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        one = hashlib.sha256()
        total.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                one.update(block)
                total.update(block)
        each[rel] = one.hexdigest()
    return each, total.hexdigest()


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"key {dup!r} appears twice (parsers disagree on which one counts)")
    return dict(pairs)


def _read_small_json(path: Path, limit: int, what: str) -> object:
    if path.stat().st_size > limit:
        raise GhostedError(f"{path}: {what} of {path.stat().st_size} bytes, over the {limit}-byte bound")
    try:
        return parse_json(path.read_bytes(), str(path), what, max_bytes=limit, pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:  # parse_json's own errors (size, depth, syntax, keys) are one line already
        raise GhostedError(f"{path}: {what} is not valid JSON ({' '.join(str(exc).split())[:200]})") from exc


def _is_legacy(doc: dict) -> bool:
    return doc["ghosted"].get("format") is None


def _check_manifest(folder: Path, hashes: dict[str, str] | None = None) -> list[str]:
    """Every file the manifest lists is there with its sha256, and nothing a loader reads is unlisted. Files no
    loader reads (README.md, .gitattributes, LICENSE, images, notes) may be added, edited or removed; returns those
    that differ from the manifest. `hashes`: the files' sha256 when already computed (verified)."""
    def sha(name: str) -> str:
        return hashes[name] if hashes is not None and name in hashes else file_sha256(folder / name)

    try:
        manifest = _read_small_json(folder / MANIFEST, MAX_CONFIG, MANIFEST)
    except FileNotFoundError:
        raise GhostedError(f"{folder}: no {MANIFEST}, so its files cannot be checked (a checkpoint of format "
                           f"{FORMAT} is always written with one: it was deleted, or the folder re-saved by another "
                           "tool); write the checkpoint again with `ghosted prune` or `ghosted fuse`") from None
    except UnicodeDecodeError as exc:  # the JSON reader's own errors (size, depth, syntax) are one line already
        raise GhostedError(f"{folder}/{MANIFEST} is not valid JSON ({exc})") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("algorithm") != "sha256" or not isinstance(files, dict) \
            or not files:
        raise GhostedError(f"{folder}/{MANIFEST}: no sha256 file list")
    present = set(_listed_files(folder))
    changed: list[str] = []
    for name, digest in files.items():
        if not read_by_loaders(name):
            if name not in present or sha(name) != digest:
                changed.append(name)
        elif name not in present:
            raise GhostedError(f"{folder}: {name} is listed in the manifest but missing")
        elif sha(name) != digest:
            raise GhostedError(f"{folder}: {name} was modified after it was written (sha256 differs from the manifest)")
    extra = sorted(present - set(files))
    refused = [name for name in extra if read_by_loaders(name)]
    if refused:
        raise GhostedError(f"{folder}: file(s) not in the manifest: {', '.join(refused)} (only files no loader "
                           "reads, such as README.md, .gitattributes or notes.txt, may be added)")
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
        if f.is_file() and "auto_map" in _read_small_json(f, MAX_CONFIG, tok_cfg):
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


def _index_shards(folder: Path, index: str, present: set[str]) -> tuple[list[str], dict[str, str]]:
    """The shard files a weights index names (each a plain file name in this folder, present) and its map."""
    doc = _read_small_json(folder / index, MAX_INDEX, "weights index")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise GhostedError(f"{folder}/{index}: no weight_map of tensor names to shard files")
    for key, shard in weight_map.items():
        p = PurePosixPath(shard) if isinstance(shard, str) else None
        if p is None or len(p.parts) != 1 or p.name in ("", ".", "..") or "\\" in shard or \
                not shard.endswith(".safetensors"):
            raise GhostedError(f"{folder}/{index}: tensor {key} points at {shard!r}, not a .safetensors file of this "
                               "folder (an index may name only files beside it)")
        if shard not in present:
            raise GhostedError(f"{folder}/{index}: tensor {key} points at {shard}, which is missing")
    return sorted(set(weight_map.values())), dict(weight_map)


def _weights(folder: Path, variant: str | None, present: set[str]) -> tuple[list[str], dict[str, str] | None]:
    """(the weight files a loader reads for this kind of checkpoint, the index's tensor map or None)."""
    name = f"model.{variant}.safetensors" if variant else "model.safetensors"
    index = f"model.safetensors.index.{variant}.json" if variant else "model.safetensors.index.json"
    if name in present and index in present:
        raise GhostedError(f"{folder}: both {name} and {index}: loaders differ on which one they read; keep the one "
                           "ghosted wrote (its manifest lists it) and delete the other")
    if name in present:
        return [name], None
    if index in present:
        return _index_shards(folder, index, present)
    raise GhostedError(f"{folder}: no {name} (or its index): the weights are missing")


def _check_files(folder: Path, present: set[str], has_ghosts: bool) -> tuple[list[str], dict[str, str] | None]:
    """Every file a loader would read is one ghosted writes for this kind of checkpoint; returns the weights."""
    weights, index = _weights(folder, VARIANT if has_ghosts else None, present)
    index_name = [] if index is None else [f"model.safetensors.index.{VARIANT}.json" if has_ghosts
                                           else "model.safetensors.index.json"]
    allowed = {"config.json", "generation_config.json", MANIFEST, MARKER, *TOKENIZER_FILES, *weights, *index_name}
    code = set(_code_files(folder)) if has_ghosts else set()  # _check_code compared them with ghosted's own
    for rel in sorted(present):
        if rel in allowed or rel in code or not read_by_loaders(rel):
            continue
        if rel.startswith(_CHAT_TEMPLATES) and rel.endswith(".jinja") and rel.count("/") == 1:
            continue
        if rel.lower().endswith(_WEIGHT_SUFFIXES):
            raise GhostedError(f"{folder}: {rel} holds weights ghosted did not write there (this checkpoint's are "
                               f"{', '.join(weights)}), and a loader may read it instead: delete it")
        raise GhostedError(f"{folder}: {rel} is not a file ghosted writes into a checkpoint, and a loader may read it "
                           "(weights, code, config or tokenizer): delete it (notes belong in README.md or *.txt)")
    return weights, index

