"""Check a checkpoint folder before anything loads it: links, manifest hashes, the files a loader would read, code
files, safetensors headers, layer count, tensor names, shapes and dtypes, ghost sites, finite values.

`verified(path)` is the one entry point of every command that reads a checkpoint (export, register, eval, compare,
bench, the MLflow model, `ghosted.load`): it returns the folder's content hash (checkpoint.digest's
`checkpoint_sha256`, the identity `ghosted eval` records and the registry tags a version with), computed in the
same pass that checks the manifest, and remembers its verdict while no file of the folder changes (size, times and
inode of every file), so a command that reaches a folder twice reads it once. `checked_model(path)` is the same
for a model argument that may also be a dense Hugging Face folder, a shipped name or a hub id (not checkpoints).

The manifest only tells an intact folder from an accidentally changed one: anyone can rewrite it. So the
structure is checked on its own too: no link leaves the folder, every file a loader would read is one ghosted
writes for this kind of checkpoint (no dense `model.safetensors` beside the ghost weights, no `*.bin`, no extra
code or config), index entries name files in the folder, and each safetensors header agrees with its data and with
the architecture's tensor names, shapes and dtype.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from ghosted.checkpoint.card import is_inert
from ghosted.checkpoint.format import (
    AUTO_MAP,
    FORMAT,
    MANIFEST,
    MODEL_CLASS,
    MODEL_TYPE,
    VARIANT,
    _base_classes,
    _listed_files,
    base_config,
    remote_sources,
)
from ghosted.checkpoint.meta import ABSENT, CheckpointMeta, read_config
from ghosted.errors import GhostedError
from ghosted.io import MARKER, file_sha256
from ghosted.json_io import parse_json
from ghosted.method import arch

MAX_HEADER = 100_000_000  # bytes of a safetensors header: the safetensors library's own limit
MAX_INDEX = 64 << 20  # bytes of a weights index (a 400B model's is ~2 MB)
MAX_CONFIG = 16 << 20  # bytes of a config.json read to tell a checkpoint from a dense folder
# Element sizes of the safetensors dtypes (bits where below a byte); ghosted writes only the floating ones.
_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64,
               "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "C64": 64,
               "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
_FLOAT = frozenset({"F64", "F32", "F16", "BF16"})
_CONFIG_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
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
_CACHE_SIZE = 16


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


@dataclass(frozen=True)
class Verified:
    """A checkpoint folder that passed verify: its content hash (checkpoint.digest.checkpoint_sha256) and the
    summary `ghosted verify` prints."""

    path: Path
    sha256: str
    summary: dict = field(compare=False)


# --------------------------------------------------------------------------- the folder's files


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


# --------------------------------------------------------------------------- safetensors headers and tensors


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor: (dtype, shape)} of a safetensors file whose header agrees with its data: a bounded header of
    unique keys, each tensor's dtype size x shape equal to its byte span, the spans inside the file, in order,
    neither overlapping nor leaving gaps or trailing bytes; only floating-point dtypes (what ghosted writes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > MAX_HEADER or 8 + n > size:
            raise GhostedError(f"{path}: not a safetensors file (header length {n} for a file of {size} bytes; at "
                               f"most {MAX_HEADER})")
        raw = f.read(n)
    try:
        header = parse_json(raw, str(path), "safetensors header", max_bytes=MAX_HEADER, pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GhostedError(f"{path}: its safetensors header is not valid JSON ({' '.join(str(exc).split())[:200]})") \
            from exc
    if not isinstance(header, dict):
        raise GhostedError(f"{path}: its safetensors header is not a JSON object")
    data = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise GhostedError(f"{path}: its safetensors __metadata__ is not a map of strings")
            continue
        dtype, shape, offsets = (info.get(k) for k in ("dtype", "shape", "data_offsets")) if isinstance(info, dict) \
            else (None, None, None)
        if dtype not in _DTYPE_BITS or not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) or not isinstance(
                offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) and not isinstance(o, bool)
                                                               for o in offsets):
            raise GhostedError(f"{path}: tensor {key} has no valid dtype, shape and data_offsets in the header")
        begin, end = offsets
        if not 0 <= begin <= end <= data:
            raise GhostedError(f"{path}: tensor {key} claims bytes {begin}..{end}, outside the {data} data bytes")
        nbytes = math.prod(shape) * _DTYPE_BITS[dtype] / 8
        if nbytes != end - begin:
            raise GhostedError(f"{path}: the header says tensor {key} is {dtype} {shape} ({nbytes:g} bytes) but gives "
                               f"it {end - begin} bytes: the header lies about its data")
        if dtype not in _FLOAT:
            raise GhostedError(f"{path}: tensor {key} is {dtype}; ghosted writes floating-point tensors only")
        spans.append((begin, end, key))
        out[key] = (dtype, tuple(shape))
    at = 0
    for begin, end, key in sorted(spans):
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else f"leaves bytes {at}..{begin} unused"
            raise GhostedError(f"{path}: tensor {key} {what}: the header does not describe its data")
        at = end
    if at != data:
        raise GhostedError(f"{path}: {data - at} bytes after the last tensor that the header does not describe")
    return out


def _expected_shapes(config, base: str) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """({tensor: shape} of the base architecture with this config, the tensors it may leave out: tied weights),
    from the model built on the meta device (no memory, no weights)."""
    model_cls, _ = _base_classes(base)
    with torch.device("meta"):
        model = model_cls(config)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, set(tied)


def _check_tensors(folder: Path, doc: dict, meta: CheckpointMeta, base: str, has_ghosts: bool,
                   weights: list[str], index: dict[str, str] | None) -> None:
    from safetensors import safe_open

    config = base_config(doc, base)
    spec = arch.get_arch(config)
    n = getattr(config, spec.num_layers_key)
    d = config.get_text_config().hidden_size
    if meta.num_layers not in (None, ABSENT) and meta.num_layers != n:
        raise GhostedError(f"{folder}: config says {n} layers ({spec.num_layers_key}) but the ghosted block says "
                           f"{meta.num_layers}")
    headers: dict[str, tuple[str, tuple[int, ...]]] = {}
    for rel in weights:
        for key, info in read_header(folder / rel).items():
            if key in headers:
                raise GhostedError(f"{folder}: tensor {key} is stored twice (in {rel} and another shard)")
            if index is not None and index.get(key) != rel:
                raise GhostedError(f"{folder}: tensor {key} is in {rel} but the index says {index.get(key)}")
            headers[key] = info
    if index is not None and set(index) - set(headers):
        raise GhostedError(f"{folder}: the index names tensor(s) no shard holds: {sorted(set(index) - set(headers))[:3]}")
    ghosts = {k: shape for k, (_, shape) in headers.items() if k.startswith("ghosts.")}
    body = {k: v for k, v in headers.items() if not k.startswith("ghosts.")}
    want_dtype = _CONFIG_DTYPES.get(str(doc.get("dtype") or doc.get("torch_dtype") or ""))
    dtypes = {dt for dt, _ in body.values()}
    if len(dtypes) > 1 or (want_dtype and dtypes and dtypes != {want_dtype}):
        raise GhostedError(f"{folder}: the weights hold dtypes {sorted(dtypes)} but config.json says "
                           f"{doc.get('dtype') or doc.get('torch_dtype')} (one dtype for every non-ghost tensor)")
    layer_re = re.compile(rf"^(?:model\.)?{re.escape(spec.layers.removeprefix('model.'))}\.(\d+)\.")
    layers = {int(m[1]) for m in map(layer_re.match, body) if m}
    if layers != set(range(n)):
        raise GhostedError(f"{folder}: config says {n} layers but the weights hold layers "
                           f"{sorted(layers)[:3]}..{sorted(layers)[-3:]} ({len(layers)} in all)")
    shapes, optional = _expected_shapes(config, base)
    for key, (_, shape) in body.items():
        if key not in shapes:
            raise GhostedError(f"{folder}: tensor {key} is not a tensor of {base} with this config.json")
        if shape != shapes[key]:
            raise GhostedError(f"{folder}: tensor {key} has shape {list(shape)}, {base} with this config.json has "
                               f"{list(shapes[key])}")
    missing = sorted(set(shapes) - set(body) - optional)
    if missing:
        raise GhostedError(f"{folder}: tensor(s) {', '.join(missing[:3])} of {base} are missing from the weights")
    _check_ghosts(folder, meta, ghosts, n, d)
    for rel in weights:
        f = folder / rel
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    t = st.get_tensor(key)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise GhostedError(f"{folder}: tensor {key} has non-finite values (nan/inf)")
        except GhostedError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors' own errors: unreadable or truncated file
            raise GhostedError(f"{folder}: cannot read {f.name} ({' '.join(str(exc).split())})") from exc


def _check_ghosts(folder: Path, meta: CheckpointMeta, ghosts: dict[str, tuple[int, ...]], n: int, d: int) -> None:
    """The ghost tensors are exactly those the config's ghosts need, with their shapes."""
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


# --------------------------------------------------------------------------- the entry points


_CACHE: dict[str, tuple[tuple, Verified]] = {}


def _verify(folder: Path, files: dict[str, os.stat_result]) -> Verified:
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
    if not (folder / MANIFEST).is_file():
        _check_manifest(folder)  # the one-line refusal of a folder without its manifest, before anything is hashed
    hashes, sha = _hash_files(folder)
    unread = _check_manifest(folder, hashes)
    _check_code(folder, doc, base, has_ghosts)
    weights, index = _check_files(folder, set(files), has_ghosts)
    _check_tensors(folder, doc, meta, base, has_ghosts, weights, index)
    summary = {"path": str(folder), "ghosts": len(meta.ghost_list), "num_layers": meta.to_dict().get("num_layers"),
               "base_architecture": base, "kind": "ghost" if has_ghosts else "plain", "unchecked_files": unread,
               "checkpoint_sha256": sha}
    return Verified(folder, sha, summary)


def verified(path: str | Path) -> Verified:
    """Verify a checkpoint folder (or take the verdict of an unchanged folder verified before in this process);
    GhostedError with the reason if it must not be read."""
    folder = Path(path)
    if not folder.is_dir():
        raise GhostedError(f"{folder} is not a folder")
    files = _scan(folder)  # links and special files are refused before any file is read
    key, sig = str(folder.resolve()), _signature(files)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == sig:
        return Verified(folder, hit[1].sha256, {**hit[1].summary, "path": str(folder)})
    result = _verify(folder, files)
    _CACHE.pop(key, None)
    _CACHE[key] = (sig, result)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    return result


def _has_block(folder: Path) -> bool:
    """Whether a folder's config.json (a file of bounded size, possibly behind a link) has a `ghosted` block."""
    cfg = folder / "config.json"
    try:
        st = cfg.stat()
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CONFIG:
        return False
    try:
        doc = parse_json(cfg.read_bytes(), str(cfg), "model config", max_bytes=MAX_CONFIG)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and "ghosted" in doc


def checked_model(model: str | Path) -> Verified | None:
    """verified(model) where `model` is a ghosted checkpoint (a folder whose config.json has a `ghosted` block);
    None for any other model argument (a dense Hugging Face folder, a shipped name, a hub id, a GGUF file), which is
    no checkpoint and which its own loader reads."""
    folder = Path(str(model)).expanduser()
    if not folder.is_dir() or not _has_block(folder):
        return None
    return verified(folder)


def verify(path: str | Path) -> dict:
    """Check a checkpoint folder before anything loads it: links, manifest hashes, the files a loader reads, code,
    safetensors headers, tensor names, shapes and dtypes, layer count, ghost sites, finite values. Returns a
    summary; raises GhostedError with the reason."""
    return verified(path).summary
