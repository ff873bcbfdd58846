"""One line, not a traceback, when an example's optional dependencies are
missing: which extra of ``pyproject.toml`` to install.

Each example calls :func:`require` before importing them.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

# The extra that brings each optional module (import name -> extra).
EXTRA_OF = {
    "flax": "examples",
    "orbax": "examples",
    "sklearn": "examples",
    "matplotlib": "examples",
    "tqdm": "examples",
    "gymnax": "rl",
    "six": "rl",  # gymnax 1.0.1 imports it without declaring it
}


def require(*modules: str) -> None:
    """Imports ``modules``; if one is missing, prints one line naming the extra
    to install and exits with status 1."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            missing.append(err.name or name)
    if missing:
        extras = sorted({EXTRA_OF.get(m.split(".")[0], "examples") for m in missing})
        script = Path(sys.argv[0]).name or "this example"
        sys.exit(
            f"{script} needs {', '.join(missing)}, which is not installed: "
            f'pip install -e ".[{",".join(extras)}]"'
        )
