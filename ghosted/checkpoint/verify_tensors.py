"""The tensor checks of checkpoint.verify: each safetensors header agrees with its data, and the weights with the
architecture's tensor names, shapes and dtype, the layer count, the ghost sites, and finite values."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ghosted.checkpoint.format import _base_classes, base_config
from ghosted.checkpoint.meta import ABSENT, CheckpointMeta
from ghosted.checkpoint.verify_files import _no_duplicates
from ghosted.errors import GhostedError
from ghosted.json_io import parse_json
from ghosted.method import arch

MAX_HEADER = 100_000_000  # bytes of a safetensors header: the safetensors library's own limit
# Element sizes of the safetensors dtypes (bits where below a byte); ghosted writes only the floating ones.
_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64,
               "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "C64": 64,
               "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
_FLOAT = frozenset({"F64", "F32", "F16", "BF16"})
_CONFIG_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


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

