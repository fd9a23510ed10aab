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


def test_cli_works_without_the_e2e_package():
    """Images ship no `baton.e2e` (test machinery): `baton` must still start, without `cluster`/`images`."""
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'baton.e2e' or name.startswith('baton.e2e.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from baton.cli import build_parser\n"
        "sub = next(a for a in build_parser()._actions if a.dest == 'command')\n"
        "print(sorted(sub.choices))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'worker'" in out.stdout and "'operator'" in out.stdout
    assert "'cluster'" not in out.stdout and "'images'" not in out.stdout


def test_every_python_folder_is_a_packaged_package():
    """A subfolder with Python files that pyproject's `packages` misses works in a checkout and is missing from
    every wheel and image (the images caught `baton.operator.planner` that way once)."""
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(cfg["packages"])
    roots = {pkg: REPO / folder for pkg, folder in cfg["package-dir"].items()}
    for pkg, root in roots.items():
        for init in root.rglob("*.py"):
            rel = init.parent.relative_to(root)
            if any(part.startswith((".", "__")) for part in rel.parts):
                continue
            name = ".".join([pkg, *rel.parts])
            assert name in packages, f"{init.parent} holds Python files but {name} is not in pyproject's packages"
