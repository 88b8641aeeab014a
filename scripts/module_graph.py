#!/usr/bin/env python3
"""The shape of each crate, from its source alone: modules, the imports between them, the
cycles they form, the largest files, and how many functions return `Result<_, String>`.

    python3 scripts/module_graph.py            # a summary per crate
    python3 scripts/module_graph.py --edges    # and every module-to-module import

An edge A -> B means a file of module A names `crate::B…` or reaches B through `super::`.
Modules are the crate's files (`src/a/b.rs` and `src/a/b/mod.rs` are `a::b`); a cycle is a
strongly connected group of them. `#[cfg(test)]` blocks count like the rest: a test that
imports a module is an import too. Standard library only, so anyone can run it.
"""

import re
import sys
from collections import defaultdict
from pathlib import Path

CRATES = ["common", "certs", "coordinator", "agent"]
PATH_RE = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP_RE = re.compile(r"use\s+(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*)\}", re.S)
COMMENT_RE = re.compile(r"//[^\n]*")
STRING_RESULT_RE = re.compile(r"->\s*Result<[^;{]*,\s*String>")


def module_of(src: Path, file: Path) -> str:
    rel = file.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "main", "lib"):
        parts = parts[:-1]
    return "::".join(parts) or "(root)"


def resolve(base: str, known: set, mod: str, file: Path, tail: str) -> str | None:
    """The longest known module named by `base tail` seen from module `mod`."""
    names = [n for n in tail.split("::") if n]
    if base == "crate":
        start = []
    else:  # super: the parent of this file's module (a mod.rs is its directory's module)
        start = mod.split("::")[:-1] if mod != "(root)" else []
        if file.name not in ("mod.rs", "main.rs", "lib.rs"):
            pass
        names_super = names
        while names_super and names_super[0] == "super":
            start = start[:-1]
            names_super = names_super[1:]
        names = names_super
    best = None
    path = list(start)
    for n in names:
        path.append(n)
        candidate = "::".join(path)
        if candidate in known:
            best = candidate
    if best is None and start:
        best = "::".join(start)
    return best


def scc(nodes, edges):
    """Tarjan's strongly connected components."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
            out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def crate_shape(root: Path, show_edges: bool) -> None:
    src = root / "src"
    files = sorted(p for p in src.rglob("*.rs"))
    mods = {module_of(src, f): f for f in files}
    known = set(mods)
    edges = defaultdict(set)
    string_results = 0
    for mod, f in mods.items():
        # Comments (doc comments included) name paths without importing them.
        text = COMMENT_RE.sub("", f.read_text())
        string_results += len(STRING_RESULT_RE.findall(text))
        refs = [(m.group(1), m.group(2)) for m in PATH_RE.finditer(text)]
        for g in USE_GROUP_RE.finditer(text):
            for item in re.split(r"[,\s]+", g.group(3)):
                item = item.split("::")[0].strip()
                if item and item not in ("self", "*") and re.match(r"[a-z_]", item):
                    refs.append((g.group(1), f"{g.group(2)}::{item}"))
        for base, tail in refs:
            target = resolve(base, known, mod, f, tail)
            if target and target != mod and target != "(root)":
                edges[mod].add(target)
    nodes = set(mods)
    comps = [c for c in scc(nodes, edges) if len(c) > 1]
    comps.sort(key=len, reverse=True)
    top = lambda m: m.split("::")[0]
    top_edges = {(top(a), top(b)) for a, bs in edges.items() for b in bs if top(a) != top(b)}
    tops = {top(m) for m in mods if m != "(root)"}
    top_graph = defaultdict(set)
    for a, b in top_edges:
        top_graph[a].add(b)
    top_comps = [c for c in scc(tops, top_graph) if len(c) > 1]
    lines = sorted(((len(f.read_text().splitlines()), m) for m, f in mods.items()), reverse=True)
    print(f"## {root.name}")
    print(f"files {len(files)}, lines {sum(n for n, _ in lines)}, file imports {sum(len(v) for v in edges.values())}")
    print(f"top-level modules {len(tops)}, arrows between them {len(top_edges)} of {len(tops) * (len(tops) - 1)} possible")
    print(f"file cycles: {[len(c) for c in comps] or 'none'}")
    for c in comps[:3]:
        print(f"  cycle of {len(c)}: {', '.join(c)}")
    print(f"top-level cycles: {[len(c) for c in top_comps] or 'none'}")
    for c in top_comps[:3]:
        print(f"  {', '.join(c)}")
    print(f"functions returning Result<_, String>: {string_results}")
    print("largest files: " + ", ".join(f"{m} {n}" for n, m in lines[:6]))
    if show_edges:
        for a in sorted(edges):
            print(f"  {a} -> {', '.join(sorted(edges[a]))}")
    print()


def main() -> None:
    repo = Path(__file__).resolve().parent.parent
    show_edges = "--edges" in sys.argv
    for c in CRATES:
        crate_shape(repo / c, show_edges)


if __name__ == "__main__":
    main()
