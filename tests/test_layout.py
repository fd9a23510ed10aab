"""The repository layout promises: no top-level package shadows the stdlib, and the CLI is wired."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_repository_root_on_sys_path_never_shadows_stdlib_operator():
    # -I -S: no site, so `operator` is not pre-imported; the checkout comes first on sys.path.
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import operator; print(operator.__file__)"
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True)
    assert not out.stdout.strip().startswith(str(REPO)), out.stdout
    for folder in ("operator", "worker"):
        assert not (REPO / folder / "__init__.py").exists(), f"{folder}/__init__.py would make it a top-level package"


def test_parts_import_under_the_baton_namespace():
    import baton.operator.api
    import baton.worker.engine.types

    assert Path(baton.operator.api.__file__).parent == REPO / "operator"
    assert Path(baton.worker.engine.types.__file__).parent == REPO / "worker" / "engine"


def test_cli_lists_every_part():
    out = subprocess.run([sys.executable, "-m", "baton.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("operator", "crd", "worker", "model", "cluster"):
        assert command in out.stdout, out.stdout
