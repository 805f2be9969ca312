"""The package's import graph: acyclic at module level, and acyclic even counting the imports deferred
into functions. Read from the source (ast), so nothing is imported."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llc_bench"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imported(node: ast.AST) -> set[str]:
    """llc_bench modules an import statement loads: the module itself, its parent packages, and for
    `from package import name` the submodule `name` when there is one."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    else:
        return set()
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[:k]) for k in range(1, len(parts) + 1) if ".".join(parts[:k]) in MODULES)
    return out


def import_graph(deferred: bool) -> dict[str, set[str]]:
    """module -> the llc_bench modules it imports at module level (and, with deferred, inside functions)."""
    def visit(node: ast.AST, in_function: bool, edges: set[str]) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if deferred or not inside:
                edges.update(_imported(child))
            visit(child, inside, edges)

    graph = {}
    for name, path in MODULES.items():
        edges: set[str] = set()
        visit(ast.parse(path.read_text()), False, edges)
        edges.discard(name)
        # a package's parents are loaded before it: not an edge a module chose
        graph[name] = {m for m in edges if not name.startswith(m + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_the_shared_bottom_modules():
    graph = import_graph(deferred=False)
    assert {"llc_bench.types", "llc_bench.rules", "llc_bench.jobs.store", "llc_bench.jobs.executor"} <= set(graph)
    assert graph["llc_bench.types"] == set()  # imported by all, importing nothing of the package
    assert graph["llc_bench.rules"] == {"llc_bench.types"}
    for user in ("llc_bench.health", "llc_bench.diagnostics", "llc_bench.estimator"):
        assert "llc_bench.rules" in graph[user] and "llc_bench.runner" not in graph[user]
    assert {"llc_bench.jobs.store", "llc_bench.jobs.executor"} <= graph["llc_bench.bench"] & graph["llc_bench.sweep"]


def test_module_level_imports_are_acyclic():
    assert find_cycle(import_graph(deferred=False)) is None


def test_deferred_imports_close_no_cycle():
    assert find_cycle(import_graph(deferred=True)) is None


def test_the_graph_sees_deferred_imports():
    """A function-level import is an edge only with deferred=True (sgld's MALA check loads health late)."""
    assert "llc_bench.health" in import_graph(deferred=True)["llc_bench.samplers.sgld"]
    assert "llc_bench.health" not in import_graph(deferred=False)["llc_bench.samplers.sgld"]


def test_the_automatic_step_size_names_no_sampler():
    """curvature asks a sampler's SamplerSpec for its capabilities: it imports no sampler module,
    and no sampler but one that resolves "auto" itself (its spec's build_auto) imports curvature."""
    graph = import_graph(deferred=True)
    samplers = {m for m in graph if m.startswith("llc_bench.samplers.")}
    assert graph["llc_bench.curvature"] & samplers <= {"llc_bench.samplers.base"}
    assert {m for m in samplers if "llc_bench.curvature" in graph[m]} == {"llc_bench.samplers.curvature_sgld"}
