"""The package's imports only go down and never form a cycle; cupy is imported in aircupy/cuda alone.

Every `import` and `from ... import` in aircupy/ is read from the source (module level and inside
functions alike: a lazy import is still a dependency), mapped to the unit it belongs to, and checked
against the layer order below. A unit may import itself and any unit of a lower layer; units of the
same layer are siblings and may not import each other.
"""
from __future__ import annotations

import ast
from pathlib import Path

import aircupy

PKG = Path(aircupy.__file__).parent

# Lowest first. The folder listing reads as the path of the data: file -> reference oracle /
# host-side streaming -> the CUDA backend -> engine -> the faces (console, server, inspect, CLI).
LAYERS = [
    ["aircupy.errors", "aircupy.version"],
    ["aircupy.gguf"],
    ["aircupy.config", "aircupy.synth"],
    ["aircupy.reference", "aircupy.stream"],
    ["aircupy.cuda"],
    ["aircupy.engine"],
    ["aircupy.console"],
    ["aircupy.server", "aircupy.inspect"],
    ["aircupy.cli"],
    ["aircupy", "aircupy.__main__"],
]
RANK = {unit: r for r, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    two = ".".join(parts[:2])
    return two if two in RANK else module


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every aircupy module `path` imports (and cupy as 'cupy')."""
    tree = ast.parse(path.read_text(), str(path))
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            # `from aircupy.cuda import ops` imports the module aircupy.cuda.ops; a name that is
            # no submodule (a function, a class) is taken from `mod` itself
            subs = [f"{mod}.{a.name}" for a in node.names]
            subs = [s for s in subs if (PKG.parent / (s.replace(".", "/") + ".py")).exists()
                    or (PKG.parent / s.replace(".", "/") / "__init__.py").exists()]
            out += [(s, node.lineno) for s in subs]
            if len(subs) < len(node.names):
                out.append((mod, node.lineno))
    return [(m, ln) for m, ln in out if m == "aircupy" or m.startswith("aircupy.") or
            m.split(".")[0] in ("cupy", "cupyx")]


def _graph():
    graph = {}
    for path in sorted(PKG.rglob("*.py")):
        graph[_module_name(path)] = (path, _imports(path))
    return graph


def test_imports_only_go_down():
    bad = []
    for me, (path, imports) in _graph().items():
        u = _unit(me)
        assert u in RANK, f"{me}: not placed in a layer (add its unit to LAYERS)"
        for mod, line in imports:
            if mod.split(".")[0] in ("cupy", "cupyx"):
                continue
            v = _unit(mod)
            if v == u:
                continue
            if v not in RANK:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {mod}, which is in no layer")
            elif RANK[v] >= RANK[u]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} ({u}, layer {RANK[u]}) imports "
                           f"{mod} ({v}, layer {RANK[v]})")
    assert not bad, "imports that do not go down:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: {i for i, _ in imps if i in _graph_names()} for m, (_, imps) in _graph().items()}
    # A module importing a submodule also runs its parent package's __init__; that edge is implied,
    # not written, and is left out here (the parent importing its children is the usual gathering).
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n == m:
                continue
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _graph_names():
    return {_module_name(p) for p in PKG.rglob("*.py")}


def test_cupy_is_imported_in_cuda_alone():
    bad = [f"{path.relative_to(PKG.parent)}:{line}"
           for me, (path, imports) in _graph().items() if _unit(me) != "aircupy.cuda"
           for mod, line in imports if mod.split(".")[0] in ("cupy", "cupyx")]
    assert not bad, "cupy imported outside aircupy/cuda: " + ", ".join(bad)


def test_the_checker_sees_a_planted_upward_import(tmp_path):
    """The walk really parses imports: an upward one in a synthetic module is caught."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from aircupy.server import app\n")
    tree = ast.parse(src.read_text())
    mods = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert mods == ["aircupy.server"] and RANK[_unit("aircupy.server")] > RANK[_unit("aircupy.cuda")]
