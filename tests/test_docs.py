"""The documentation covers the public API, and the README its pages."""

import re
from pathlib import Path

import rgclip_optax as rgc

ROOT = Path(__file__).resolve().parents[1]
API = (ROOT / "docs" / "api.md").read_text()


def _documented() -> set[str]:
    return set(re.findall(r"\.\. auto(?:function|class):: rgclip_optax\.(\w+)", API))


def _summarized() -> set[str]:
    block = API.split(".. autosummary::", 1)[1].split("```", 1)[0]
    return {line.strip() for line in block.splitlines() if line.strip()}


def test_every_public_name_has_a_reference_entry():
    missing = set(rgc.__all__) - _documented()
    assert not missing, f"add to docs/api.md: {sorted(missing)}"


def test_the_reference_documents_only_public_names():
    assert _documented() <= set(rgc.__all__)


def test_the_summary_table_lists_every_public_name():
    assert _summarized() == set(rgc.__all__)


def test_the_readme_links_every_documentation_page():
    readme = (ROOT / "README.md").read_text()
    pages = {
        p.stem
        for p in (ROOT / "docs").glob("*.md")
        if p.stem not in {"index", "changelog"}
    }
    linked = set(re.findall(r"\(docs/(\w+)\.md\)", readme))
    assert pages <= linked, f"README lacks links to {sorted(pages - linked)}"


def test_the_version_is_defined_once():
    # pyproject.toml reads it from the package (setuptools' dynamic version).
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "rgclip_optax.__version__" }' in pyproject
    assert not re.search(r'^version\s*=\s*"', pyproject, re.MULTILINE)
    assert re.fullmatch(r"\d+\.\d+\.\d+", rgc.__version__)
    assert f"## {rgc.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_the_readme_usage_example_runs():
    readme = (ROOT / "README.md").read_text()
    usage = readme.split("## Use it", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, re.DOTALL)
    assert code is not None
    namespace: dict = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    assert float(namespace["optax"].tree.get(namespace["state"], "grad_norm")) > 0
