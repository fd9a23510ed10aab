"""Baton: a Kubernetes operator for prefill/decode-disaggregated LLM serving fleets.

The repository keeps the control plane in `operator/` and the data plane in `worker/`; they install as
`baton.operator` and `baton.worker` and deliberately have no top-level `__init__.py`, so that a source
checkout on `sys.path` can never shadow the stdlib module `operator`. setuptools' editable finder cannot
resolve such namespace subpackages below a regular package, so in a source checkout the repository root is
added to this package's search path; an installed wheel has the real `baton/operator/` folder instead.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "operator").is_dir():
    __path__.append(str(_checkout))  # type: ignore[name-defined]
