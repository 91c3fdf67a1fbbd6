"""How the packages depend on each other: no module of mindbooth/ or gm/ imports tools/, no plain gm module imports
the CPU backend, and gm's modules import each other without a cycle."""
import ast

from conftest import ROOT


def _imported_modules(path):
    """Absolute module names a file imports, wherever the import statement sits (top level or in a function)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_mindbooth_and_gm_do_not_import_tools():
    files = sorted([*ROOT.glob("mindbooth/**/*.py"), *ROOT.glob("gm/**/*.py")])
    assert len(files) > 20  # the walk found the packages
    offenders = [f"{path.relative_to(ROOT)} imports {name}" for path in files for name in _imported_modules(path)
                 if name == "tools" or name.startswith("tools.")]
    assert offenders == []


def test_plain_gm_does_not_import_the_cpu_backend():
    """Only gm/backends reaches the CPU package (gm/backends/__init__.py asks for it lazily): deleting
    gm/backends/cpu leaves a working plain model (test_backends runs one)."""
    files = [path for path in ROOT.glob("gm/**/*.py") if "backends" not in path.relative_to(ROOT / "gm").parts]
    assert len(files) > 20
    offenders = [f"{path.relative_to(ROOT)} imports {name}" for path in files for name in _imported_modules(path)
                 if name.startswith("gm.backends.cpu")]
    assert offenders == []


def _module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_gm_modules_import_each_other_without_a_cycle():
    """The imports between gm's modules form no cycle, counting those inside functions too: a lazy import that only
    dodges a cycle at load time (lora.py <-> frozen_weights.py had one) is still a cycle of concepts."""
    modules = {_module_name(path): path for path in ROOT.glob("gm/**/*.py")}

    def imports(path):  # `from package import submodule` imports the submodule
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                yield from (alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    yield submodule if submodule in modules else node.module

    graph = {name: {imported for imported in imports(path) if imported in modules and imported != name}
             for name, path in modules.items()}
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", " -> ".join((*trail, name))
        state[name] = "open"
        for imported in sorted(graph[name]):
            visit(imported, (*trail, name))
        state[name] = "done"

    for name in sorted(graph):
        visit(name, ())
