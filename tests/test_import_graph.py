"""The engine's import graph is a DAG with storage at the bottom, and the engine never imports a GUI.

Every ``import`` statement counts, wherever it is: at module level, inside a function, under ``if``
(a function-local import hides a cycle from Python, not from the design). Run this file as a script to
print the graph as mermaid, or with ``--write`` to put it in docs/architecture.md (its picture):

    python tests/test_import_graph.py [--write]
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"
PACKAGE = "engine"
DOC = ROOT / "docs" / "architecture.md"
FENCE = "```mermaid\n"
#: storage: the modules every other one may use, and which use no science module themselves
STORAGE = {"errors": set(), "fileio": {"errors"}, "config": set(),
           "checkpoint": {"config", "errors", "fileio"}, "runlock": {"errors", "fileio"}, "precision": set(),
           "run_status": {"fileio", "runlock"}, "unzip": {"errors", "fileio"}}
#: the layers of docs/architecture.md, bottom up: a module imports modules of its own layer or below
LAYERS = (
    ("storage", set(STORAGE)),
    ("science", {"metrics", "structure", "morphology", "features", "geojson", "data", "inspection", "subset",
                 "colour_prior",
                 "synthetic", "render", "unet",
                 "diffusion", "samplers", "tiling", "memory", "canvas", "curate", "quality", "segment", "evaluate",
                 "export", "two_sample", "copying", "conditioning"}),
    ("pipeline", {"pipeline", "guidance", "train", "worker", "demo"}),
    ("front ends", {"cli", "__main__", "__init__"}),
)


def imports_of(source: str, modules: set[str]) -> dict[str, list[int]]:
    """{engine module imported: [line numbers]} of one engine module's source, for every import statement
    in it (module level or not): ``import engine.x``, ``from engine.x import ...``, ``from engine import x``,
    ``from .x import ...`` and ``from . import x``. ``import engine`` alone (the package) is not an edge."""
    found: dict[str, list[int]] = {}

    def add(name: str, line: int) -> None:
        if name in modules:
            found.setdefault(name, []).append(line)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE and len(parts) > 1:
                    add(parts[1], node.lineno)
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".") if node.module else []
            if node.level == 0 and parts[:1] != [PACKAGE]:
                continue
            if node.level == 0:
                parts = parts[1:]
            if parts:
                add(parts[0], node.lineno)
            else:  # from engine import x / from . import x: x may be a module
                for alias in node.names:
                    add(alias.name, node.lineno)
    return found


def engine_graph(folder: Path = ENGINE) -> dict[str, dict[str, list[int]]]:
    """{module: {engine module it imports: [line numbers]}} for every engine/*.py (self-imports left out)."""
    files = sorted(folder.glob("*.py"))
    modules = {p.stem for p in files}
    graph = {}
    for p in files:
        deps = imports_of(p.read_text(encoding="utf-8"), modules)
        deps.pop(p.stem, None)
        graph[p.stem] = deps
    return graph


def find_cycle(graph: dict[str, dict[str, list[int]] | set[str]]) -> list[str] | None:
    """A cycle [a, b, ..., a] of the graph, or None when it is a DAG (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, list[int]]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b][0]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def layers(graph: dict[str, dict[str, list[int]]]) -> dict[str, int]:
    """Layer of each module: 0 for one that imports no engine module, else 1 + the highest of its imports."""
    out: dict[str, int] = {}

    def level(m: str) -> int:
        if m not in out:
            out[m] = 1 + max((level(d) for d in graph[m]), default=-1)
        return out[m]

    for m in graph:
        level(m)
    return out


def mermaid(graph: dict[str, dict[str, list[int]]]) -> str:
    """The graph as a mermaid flowchart, bottom-up (storage at the bottom), edges that a lower edge already
    implies left out (transitive reduction) so the picture stays readable."""
    reach: dict[str, set[str]] = {}

    def closure(m: str) -> set[str]:
        if m not in reach:
            reach[m] = set()
            for d in graph[m]:
                reach[m] |= {d} | closure(d)
        return reach[m]

    lines = ["flowchart BT"]
    for m in sorted(graph, key=lambda m: (layers(graph)[m], m)):
        for d in sorted(graph[m]):
            if not any(d in closure(o) for o in graph[m] if o != d):
                lines.append(f"    {m} --> {d}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tests


def test_parser_sees_every_form_of_import():
    src = (
        "import engine.a\n"
        "import engine.b as bb\n"
        "from engine.c import x\n"
        "from engine import d, not_a_module\n"
        "from .e import y\n"
        "from . import f\n"
        "import engine\n"
        "import os, numpy\n"
        "def late():\n"
        "    from engine.g import z\n"
        "    if True:\n"
        "        import engine.h.sub\n"
        "class K:\n"
        "    def m(self):\n"
        "        from engine import i\n"
    )
    found = imports_of(src, set("abcdefghi") | {"engine"})
    assert found == {"a": [1], "b": [2], "c": [3], "d": [4], "e": [5], "f": [6], "g": [10], "h": [12], "i": [15]}


def test_find_cycle_reports_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    cycle = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {"b"}})
    assert cycle == ["b", "c", "d", "b"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_engine_import_graph_has_no_cycle():
    graph = engine_graph()
    assert {"checkpoint", "pipeline", "guidance", "curate", "fileio"} <= set(graph)  # it read the real package
    assert graph["pipeline"] and graph["cli"]
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle in engine: {describe(cycle, graph)}"


def test_storage_is_at_the_bottom():
    graph = engine_graph()
    for module, allowed in STORAGE.items():
        extra = set(graph[module]) - allowed
        assert not extra, f"engine.{module} is storage but imports {sorted(extra)}: " + \
            "; ".join(f"{m} at line {graph[module][m][0]}" for m in sorted(extra))


def test_every_module_imports_only_its_own_layer_or_below():
    graph = engine_graph()
    rank = {m: i for i, (_, members) in enumerate(LAYERS) for m in members}
    unplaced = sorted(set(graph) - set(rank))
    assert not unplaced, f"place {unplaced} in a layer (LAYERS here and docs/architecture.md)"
    upward = [f"{m} ({LAYERS[rank[m]][0]}) imports {d} ({LAYERS[rank[d]][0]}) at line {lines[0]}"
              for m, deps in graph.items() for d, lines in deps.items() if rank[d] > rank[m]]
    assert not upward, "; ".join(upward)


def test_the_architecture_picture_is_the_real_graph():
    """docs/architecture.md's mermaid block is this file's output: when the imports change, rewrite it with
    `python tests/test_import_graph.py --write`."""
    block = DOC.read_text(encoding="utf-8").split(FENCE, 1)[1].split("```", 1)[0].strip()
    assert block == mermaid(engine_graph()), \
        "docs/architecture.md's graph is stale: run python tests/test_import_graph.py --write"


def test_engine_source_never_imports_gradio():
    for p in sorted(ENGINE.glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.split(".")[0] in ("gradio", "gradio_client", "nudiff_app")]
            assert not bad, f"{p.name} line {node.lineno} imports {bad}: the engine has no GUI"


def test_importing_the_whole_engine_loads_no_gradio():
    modules = sorted(m for m in engine_graph() if m not in ("__main__",))
    code = (f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module('engine.' + m)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('gradio', 'nudiff_app')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout


if __name__ == "__main__":
    g = engine_graph()
    if "--write" in sys.argv[1:]:  # replace the picture in docs/architecture.md
        head, rest = DOC.read_text(encoding="utf-8").split(FENCE, 1)
        DOC.write_text(head + FENCE + mermaid(g) + "\n" + "```" + rest.split("```", 1)[1], encoding="utf-8")
    else:
        print(mermaid(g))
    print(f"%% {len(g)} modules, {sum(len(d) for d in g.values())} import edges, cycle: {find_cycle(g)}",
          file=sys.stderr)
