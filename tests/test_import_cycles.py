"""The package's import graph has no cycle, counting every import statement (module level, inside functions and
under ``TYPE_CHECKING``), and the weightings never import the training loop."""

import ast
from pathlib import Path

import auxloss

SRC = Path(auxloss.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the auxloss modules it imports (``from a.b import c`` names ``a.b.c`` when that is a module)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    head = package[:len(package) - (node.level - 1)]
                    base = ".".join(head + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target in mods:
                        deps.add(target)
                    elif base in mods:
                        deps.add(base)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or ``None`` (iterative depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_type_checking_and_function_level_imports():
    graph = import_graph()
    assert len(graph) > 30
    assert "auxloss.errors" in graph["auxloss.step"]
    # auxloss.integrations.lightning imports the Trainer inside a function only
    assert "auxloss.train.trainer" in graph["auxloss.integrations.lightning"]


def test_auxloss_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_weightings_do_not_import_the_training_loop():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("auxloss.weighting"):
            assert not {d for d in deps if d.startswith("auxloss.train")}, name
