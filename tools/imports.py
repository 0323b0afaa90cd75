"""fedray's import graph: cycles between modules (every import, also inside functions), and
the modules over the size limit. ``python tools/imports.py`` prints both; the architecture test
(``tests/unit/test_architecture.py``) asserts there are none."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "fedray"


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def graph() -> dict[str, set[str]]:
    """``{module: modules of fedray it imports}`` (``import a.b`` and ``from a.b import c``,
    resolved to the longest known module; a package's ``__init__`` counts as the package)."""
    mods = modules()
    out = {}
    for name, path in mods.items():
        deps = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # imports under ``if TYPE_CHECKING:`` never run
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                node.body = []
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if not t.startswith("fedray"):
                    continue
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is not a cycle
                    deps.add(t)
        out[name] = deps
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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
                comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return comps


LIMIT = 400
EXCEPT = {"fedray.aggregation.kernels": "the numba merge kernels: one cohesive algorithm",
          "fedray.models.spec": "tracing a model into layers, channel groups, streams and FLOPs: one algorithm",
          "fedray.data.datasets": "one loader per supported file format",
          "fedray.tune": "the Ray Tune search"}


def oversized() -> list[tuple[str, int]]:
    out = []
    for name, path in sorted(modules().items()):
        n = len(path.read_text().splitlines())
        if n > LIMIT and name not in EXCEPT:
            out.append((name, n))
    return out


def main() -> int:
    cs = cycles(graph())
    for c in cs:
        print("cycle:", " <-> ".join(c))
    for name, n in oversized():
        print(f"over {LIMIT} lines: {name} ({n})")
    return 1 if cs or oversized() else 0


if __name__ == "__main__":
    sys.exit(main())
