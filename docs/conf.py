"""Sphinx configuration for the rgclip_optax documentation.

Build (warnings are errors, as in CI)::

    pip install -e ".[docs]"
    sphinx-build -W -b html docs docs/_build/html
    sphinx-build -W -b doctest docs docs/_build/doctest
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The doctests run on the CPU, whatever the machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import rgclip_optax  # noqa: E402

project = "rgclip_optax"
author = "rgclip_optax developers"
copyright = "2026, rgclip_optax developers"
release = rgclip_optax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax served from the built site, not a CDN
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_typehints = "description"
# Show the aliases the signatures use, not their expanded unions (the modules
# use postponed annotations, so autodoc sees these names).
autodoc_type_aliases = {
    "chex.Numeric": "chex.Numeric",
    "optax.ScalarOrSchedule": "optax.ScalarOrSchedule",
    "AxisName": "AxisName",
}

# Sphinx 9.0 prints an alias inside a union (``chex.Numeric | None``) by its
# repr, ``TypeAliasForwardRef('chex.Numeric')``; print its name instead.
from sphinx.util.inspect import TypeAliasForwardRef  # noqa: E402

TypeAliasForwardRef.__repr__ = lambda self: self.name  # type: ignore[method-assign]
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# The docstrings' examples are standard ``>>>`` blocks: run them too.
doctest_test_doctest_blocks = "default"
doctest_global_setup = "import os\nos.environ.setdefault('JAX_PLATFORMS', 'cpu')\n"

# No intersphinx: the build must work offline, so references to Optax and
# JAX names render as code without a link.

html_theme = "furo"
html_title = f"rgclip_optax {release}"
