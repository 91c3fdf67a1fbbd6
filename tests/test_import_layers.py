"""The library does not depend on the command-line tools: no module of mindbooth/ or gm/ imports tools/."""
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
