"""Do two result JSON files (compare.json, eval JSON) hold the same values apart from timings? Leaves whose key
ends in `seconds` and the `command` line are skipped; every other leaf must be equal (floats exactly).
Exit 0 same, 1 different.

Usage: python scripts/same_json.py A.json B.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

SKIP_SUFFIXES = ("seconds",)
SKIP_KEYS = {"command"}


def leaves(doc: Any, path: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k in SKIP_KEYS or k.endswith(SKIP_SUFFIXES):
                continue
            out.update(leaves(v, f"{path}/{k}"))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.update(leaves(v, f"{path}[{i}]"))
    else:
        out[path] = doc
    return out


def main(a: str, b: str) -> int:
    la = leaves(json.load(open(a)))
    lb = leaves(json.load(open(b)))
    differ = sorted(k for k in la.keys() | lb.keys() if la.get(k, "<absent>") != lb.get(k, "<absent>"))
    for k in differ[:30]:
        print(f"{k}: {la.get(k, '<absent>')!r} != {lb.get(k, '<absent>')!r}")
    print(f"{len(la)} leaves vs {len(lb)}: " + ("the same apart from timings" if not differ else f"{len(differ)} differ"))
    return 0 if not differ else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
