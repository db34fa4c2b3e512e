"""The layers of the source tree: no two subpackages of ``alise`` import each other (directly or
round a longer circle), and the product never imports the tooling (``alise.tools``): not in its
source, and not at run time, where the services are started by the ``alise`` command."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import alise

ROOT = Path(alise.__file__).parent
#: the product's subpackages: everything but the tooling
PRODUCT = ("core", "common", "modelinfo", "client", "cli", "v1", "scheduler", "worker", "predictor",
           "http", "cluster")


def imported_names(path: Path, root: Path = ROOT) -> list[str]:
    """The absolute names of every module ``path`` (a file under the package ``root``) imports,
    at the top or inside a function."""
    module = list(path.relative_to(root.parent).with_suffix("").parts)
    package = module[:-1]  # a relative import starts from the module's package
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            names.append(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def subpackage_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Subpackage -> the other subpackages its modules import (``alise.X``: X)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if len(parts) < 2:
            continue
        own = parts[0]
        graph.setdefault(own, set())
        for name in imported_names(path, root):
            words = name.split(".")
            if words[0] == "alise" and len(words) > 1 and words[1] != own:
                graph[own].add(words[1])
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph (its nodes in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # node -> "open" while on the path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_subpackages():
    graph = subpackage_graph()
    assert {"core", "scheduler", "worker", "tools"} <= set(graph)  # the walk saw the tree
    assert find_cycle(graph) is None


def test_the_cycle_check_finds_a_circle(tmp_path):
    root = tmp_path / "alise"
    for package, imports in {"a": "from alise.b import x", "b": "from alise.c.y import z",
                             "c": "import alise.a.w", "d": "from alise.a import v"}.items():
        (root / package).mkdir(parents=True)
        (root / package / "m.py").write_text(imports + "\n")
    graph = subpackage_graph(root)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    (root / "c" / "m.py").write_text("x = 1\n")
    assert find_cycle(subpackage_graph(root)) is None


def test_relative_imports_are_read_as_absolute(tmp_path):
    module = tmp_path / "alise" / "a" / "sub" / "m.py"
    module.parent.mkdir(parents=True)
    module.write_text("from . import x\nfrom ..n import y\nfrom ...b import z\n")
    assert imported_names(module, tmp_path / "alise") == ["alise.a.sub", "alise.a.n", "alise.b"]


def test_the_product_source_never_names_the_tooling():
    graph = subpackage_graph()
    assert set(PRODUCT) | {"tools"} >= set(graph), "a new subpackage: say whether it is product or tooling"
    assert {package for package in PRODUCT if "tools" in graph.get(package, ())} == set()


def loaded_tools(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print(sorted(m for m in sys.modules "
                          "if m.startswith('alise.tools')))"], capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])


def test_a_service_command_imports_no_tooling():
    # What `alise scheduler`/`alise up`/... import before they run: every service command's module
    # and the parser they are parsed with.
    code = ("import alise.cli.main as m; m.build_parser('scheduler').parse_args(['scheduler']); "
            "import alise.cluster.main, alise.scheduler.main, alise.worker.main, alise.http.main, "
            "alise.predictor.cli, alise.worker.service, alise.predictor.service, alise.http.app")
    assert loaded_tools(code) == []


@pytest.mark.parametrize("command", ["sim", "trace", "bench"])
def test_a_tooling_command_imports_its_tooling(command):
    # The other side of the check above: the tooling is there when its command runs.
    assert loaded_tools(f"import alise.cli.main as m; m.build_parser({command!r})") != []


def loaded_torch(modules: tuple[str, ...]) -> bool:
    tests = Path(__file__).parents[1]
    code = (f"import sys; sys.path[:0] = [{str(tests)!r}, {str(tests / 'unit')!r}]; "
            f"import {', '.join(modules)}; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] == "True"


def test_the_core_tests_load_no_torch():
    # The suite's conftest decides the Triton interpreter without torch; the core's tests and
    # their factories need none, so running them alone never imports it.
    assert not loaded_torch(("conftest", "corekit", "test_scheduler_core", "test_dispatch", "test_job_status",
                             "test_memory_planner", "test_layers"))
    assert loaded_torch(("conftest", "test_sampler"))  # the check sees torch where a test needs it
