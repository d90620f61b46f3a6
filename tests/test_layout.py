"""The package's layout: no import circle among toolkit's modules (imports inside functions
included: they run too), and the foundations import nothing of the package but each other."""

import ast

from conftest import ROOT

# Modules everything may build on; they import from the package only each other, so a change
# above them can never reach into them.
FOUNDATIONS = {"toolkit.config", "toolkit.shapes", "toolkit.files", "toolkit.launch", "toolkit.cpu"}


def module_name(path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def package_imports() -> dict[str, set[str]]:
    """{module: the toolkit modules it imports}, read from the source."""
    paths = [p for p in (ROOT / "toolkit").rglob("*.py") if "metrics" not in p.parts]  # metrics: loaded by path
    modules = {module_name(p) for p in paths}
    graph = {}
    for path in paths:
        here = module_name(path)
        package = here if path.name == "__init__.py" else here.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import job`
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[here] = {m for m in found if m in modules and m != here}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = package_imports()
    assert len(graph) > 20 and graph["toolkit.train"] >= {"toolkit.strategy", "toolkit.checkpoint"}
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_foundations_import_only_each_other():
    graph = package_imports()
    for module in FOUNDATIONS:
        assert graph[module] <= FOUNDATIONS, (module, graph[module] - FOUNDATIONS)
