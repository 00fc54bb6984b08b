"""Are two checkpoint folders' tensors bit-identical? Compares every *.safetensors tensor by name, dtype, shape
and bytes (not the manifest, which records versions). Exit 0 identical, 1 different.

Usage: python scripts/same_tensors.py DIR_A DIR_B
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from safetensors import safe_open


def tensor_hashes(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name).contiguous()
                digest = hashlib.sha256(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()).hexdigest()
                out[f"{path.name}:{name}"] = f"{t.dtype}:{tuple(t.shape)}:{digest}"
    return out


def main(a: str, b: str) -> int:
    ha, hb = tensor_hashes(Path(a)), tensor_hashes(Path(b))
    differ = sorted(k for k in ha.keys() | hb.keys() if ha.get(k) != hb.get(k))
    for k in differ[:20]:
        print(f"differs: {k}")
    print(f"{len(ha)} tensors in {a}, {len(hb)} in {b}: " + ("bit-identical" if not differ else f"{len(differ)} differ"))
    return 0 if not differ else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
