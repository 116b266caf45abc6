"""The layout of job/: no import circle among its modules (lazy imports inside functions count too), no module
over the size one reads in a sitting."""

import ast
from pathlib import Path

JOB = Path(__file__).resolve().parent.parent / "job"
MAX_LINES = 650


def module_name(path: Path) -> str:
    parts = path.relative_to(JOB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The job modules `path` imports anywhere in it (a package's __init__ stands for the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in JOB.rglob("*.py")}
    return {name: imports(path, set(paths)) - {name} for name, path in paths.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules along it, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_among_job_modules():
    edges = graph()
    # a package's __init__ importing its own modules is how a package names its API, not a circle
    for name in edges:
        edges[name] = {t for t in edges[name] if not (JOB.joinpath(*t.split(".")[1:]).is_dir()
                                                      and name.startswith(t + "."))}
    assert cycle(edges) is None, " -> ".join(cycle(edges))


def test_every_module_is_short_enough_to_read_in_a_sitting():
    long = {module_name(p): n for p in JOB.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
