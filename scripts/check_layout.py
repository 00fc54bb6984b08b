"""Check the package's shape: imports flow one way (no cycle, counting imports inside functions), the core never
imports the MLOps part, no module over 400 lines, no function over 80 lines. Exit 1 with the findings.

Usage: python scripts/check_layout.py [--graph]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ghosted", "flows")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# The MLOps part (and the command line above it) may import the core; the core never imports them.
UPPER = ("ghosted.mlops", "ghosted.cli", "ghosted.__main__", "flows")


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every project module `name` imports, at any depth of the file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    out.add(f"{target}.{alias.name}")
            if target in known:
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
    out.discard(name)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def long_functions(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            n = node.end_lineno - start + 1
            if n > MAX_FUNCTION_LINES:
                out.append((node.name, n))
    return out


def upper(name: str) -> bool:
    return any(name == u or name.startswith(u + ".") for u in UPPER)


def main() -> int:
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    problems = []
    for comp in cycles(graph):
        problems.append("import cycle: " + " <-> ".join(comp))
    for name, deps in graph.items():
        if not upper(name):
            for d in sorted(deps):
                if upper(d):
                    problems.append(f"{name} (core) imports {d}")
    for path in known.values():
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES:
            problems.append(f"{path.relative_to(ROOT)}: {n} lines (max {MAX_MODULE_LINES})")
        for fn, m in long_functions(path):
            problems.append(f"{path.relative_to(ROOT)}: function {fn} is {m} lines (max {MAX_FUNCTION_LINES})")
    if "--graph" in sys.argv:
        for name in sorted(graph):
            print(name, "->", ", ".join(sorted(graph[name])))
    for p in problems:
        print(p)
    print(f"{len(known)} modules, {len(problems)} finding(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
