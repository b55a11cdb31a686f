"""The package's import graph (every `import` of an lsa_sglang module, also inside functions)."""

import ast
from pathlib import Path

import lsa_sglang

PACKAGE = Path(lsa_sglang.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("lsa_sglang",) + path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported_names(mod: str, path: Path) -> set[str]:
    """Every dotted name the module imports (relative imports resolved; for `from a import b`
    both `a` and `a.b`)."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()

    def known(name: str) -> str | None:  # the module an imported name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        targets = {known(n) for n in _imported_names(mod, path) if n.startswith("lsa_sglang")}
        graph[mod] = targets - {None, mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_sees_a_cycle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles():
    graph = _import_graph()
    assert "lsa_sglang.session" in graph["lsa_sglang.plugin"]  # the graph sees function-level imports
    assert _cycles(graph) == []


def test_only_the_registered_pieces_import_sglang():
    """SGLang internals stay in the modules the plugin registers (plus the launcher and metrics,
    which use SGLang's public launcher and metrics), so an SGLang upgrade is a change there."""
    importers = {mod for mod, path in _modules().items()
                 if any(n == "sglang" or n.startswith("sglang.") for n in _imported_names(mod, path))}
    assert importers == {
        "lsa_sglang.plugin", "lsa_sglang.attention.backend", "lsa_sglang.memory.radix",
        "lsa_sglang.launch_server", "lsa_sglang.metrics", "lsa_sglang.gpu_mode",
    }
