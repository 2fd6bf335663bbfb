"""Check the package's import structure: no import cycles and no import that runs upward between layers.

    python3 scripts/check_structure.py            # prints the layers, exits 1 on a cycle or an upward import

Every `import chatstack...` counts, at the top of a module or inside a function. The layers, lowest first;
a module may import its own layer and those below it:
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "chatstack"

# (layer name, module prefixes). The first prefix that matches a module (longest first) places it.
LAYERS = [
    ("plumbing", ["chatstack.args", "chatstack.data.jsonl", "chatstack.data.builtin"]),
    ("tokenizer", ["chatstack.tokenizer"]),
    (
        "model",
        [
            "chatstack.kernels",
            "chatstack.model",
            "chatstack.heads",
            "chatstack.presets",
            "chatstack.checkpoint",
            "chatstack.estimate",
            "chatstack.vision",
        ],
    ),
    ("data", ["chatstack.data"]),
    ("inference", ["chatstack.infer"]),
    ("training", ["chatstack.train"]),
    ("methods", ["chatstack.rlhf", "chatstack.evals", "chatstack.interop"]),
    ("serving", ["chatstack.serve"]),
    ("stages", ["chatstack.stages"]),
    ("cli", ["chatstack.cli", "chatstack"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(mod: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise SystemExit(f"{mod}: in no layer of scripts/check_structure.py; add it")
    return best


def imports_of(path: Path, mod: str, modules: set[str]) -> set[str]:
    """The chatstack modules `path` imports (a `from pkg import name` of a submodule counts as that submodule)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in modules:  # `import chatstack.x.y as z` / a name inside a module
                n = n.rpartition(".")[0]
            if n and n != mod:
                out.add(n)
    return out


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
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
                sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sccs


def main() -> int:
    files = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    modules = set(files)
    graph = {m: imports_of(p, m, modules) for m, p in files.items()}
    # a package's __init__ runs before its submodules: importing chatstack.x.y imports chatstack.x, which is
    # no dependency of interest; drop edges to packages whose __init__ imports nothing
    upward = [(m, t) for m, ts in graph.items() for t in sorted(ts) if layer_of(t) > layer_of(m)]
    cycles = find_cycles(graph)
    for i, (name, prefixes) in enumerate(LAYERS):
        print(f"{i} {name:10s} {', '.join(prefixes)}")
    print(f"{len(modules)} modules, {sum(len(t) for t in graph.values())} imports")
    for m, t in upward:
        print(f"upward import: {m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})")
    for c in cycles:
        print("import cycle: " + " <-> ".join(c))
    print(f"{len(cycles)} cycles, {len(upward)} upward imports")
    return 1 if cycles or upward else 0


if __name__ == "__main__":
    sys.exit(main())
