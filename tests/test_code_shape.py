"""The package's shape (STYLE.md): lines of at most 120 characters, one statement per line, imports at the top, and
only imports that the module uses.

A function-local import is allowed only with a comment saying why (an optional heavy dependency, a subprocess
boundary), on its line or the line above. nbdev's generated `__all__` lines are exempt.
"""
import ast, io, tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "microlm"
MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name != "_modidx.py")


def _all_lines(text: str) -> set[int]:
    "Line numbers of the `__all__ = [...]` statement nbdev generates."
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(range(node.lineno, node.end_lineno + 1))
    return set()


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_module_shape(path):
    text = path.read_text()
    lines, exempt = text.splitlines(), _all_lines(text)
    long = [f"{path.name}:{i}: {len(l)} characters" for i, l in enumerate(lines, 1) if len(l) > 120 and i not in exempt]
    joined = [f"{path.name}:{t.start[0]}: statements joined with ';'"
              for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.OP and t.string == ";"]
    local = []
    for fn in ast.walk(ast.parse(text)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
                    if "#" not in here and not above.strip().startswith("#"):
                        local.append(f"{path.name}:{node.lineno}: function-local import without a reason")
    assert not (long or joined or local), "\n".join(long + joined + local)


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_module_imports_are_used(path):
    "A module imports at its top only what it uses: what only a notebook's own cells need goes in a hidden cell."
    tree = ast.parse(path.read_text())
    imported = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "module", None) != "__future__":
            for a in node.names:
                imported[(a.asname or a.name).split(".")[0]] = node.lineno
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    exported = {e.value for n in tree.body if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__"
                for t in n.targets) for e in n.value.elts}
    unused = [f"{path.name}:{line}: {name} imported but unused" for name, line in imported.items()
              if name not in used | exported]
    assert not unused, "\n".join(unused)
