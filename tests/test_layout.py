"""The library's layout: short functions, no import circle, no mutable globals."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rgclip_optax"
MODULES = sorted(PACKAGE.glob("*.py"))
MAX_CODE_LINES = 60


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            lines |= set(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def _functions(path: Path):
    source = path.read_text()
    tree = ast.parse(source)
    text = source.splitlines()
    docs = _docstring_lines(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            code = [
                i
                for i in range(node.lineno, node.end_lineno + 1)
                if i not in docs
                and text[i - 1].strip()
                and not text[i - 1].strip().startswith("#")
            ]
            yield node.name, len(code)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_function_is_over_60_lines_of_code(path):
    # Nested functions count toward the function holding them.
    long = [(n, c) for n, c in _functions(path) if c > MAX_CODE_LINES]
    assert not long, f"{path.name}: {long}"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "rgclip_optax":
                found |= {f"rgclip_optax.{a.name}" for a in node.names}
            elif node.module.startswith("rgclip_optax."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("rgclip_optax.")}
    return {m.split(".")[1] for m in found}


def test_no_module_imports_itself_back():
    graph = {p.stem: _imports(p) - {p.stem} for p in MODULES if p.stem != "__init__"}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == target or (
                nxt not in seen and reaches(nxt, target, seen | {nxt})
            ):
                return True
        return False

    circles = [m for m in graph if reaches(m, m, {m})]
    assert not circles, f"import circles through {circles}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_module_level_mutable_state(path):
    # Module-level lists, dicts, sets and context variables; constants are
    # tuples, numbers and strings. (_platform's JAX configuration state is a
    # context-managed setting in jit's cache key, not a global to mutate.)
    mutable = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)
    bad = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if [ast.unparse(t) for t in targets] == ["__all__"]:
                continue  # the public namespace's declaration
            value = node.value
            called = isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[
                -1
            ] in ("ContextVar", "list", "dict", "set", "defaultdict")
            if isinstance(value, mutable) or called:
                bad.append(ast.unparse(node)[:60])
    assert not bad, f"{path.name}: {bad}"


def test_the_package_docstring_maps_every_module():
    # The package docstring is the reader's map: every private module is
    # named in it, so a new module cannot be added without a place there.
    import rgclip_optax

    doc = rgclip_optax.__doc__ or ""
    private = [
        p.name for p in MODULES if p.name.startswith("_") and p.stem != "__init__"
    ]
    missing = [name for name in private if f"``{name}``" not in doc]
    assert private and not missing, f"not in the package docstring: {missing}"
