"""The generated CRD: structural (Kubernetes 1.20 accepts it), committed copy up to date, CLI behaviour."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from baton.operator.crd import PRINTER_COLUMNS, build_crd, openapi_schema, render_crd_yaml

from baton.cli import main

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "crds" / "llmservice.yaml"

ALLOWED_KEYS = {
    "type", "description", "format", "enum", "default", "minimum", "exclusiveMinimum", "maximum",
    "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems", "maxItems", "minProperties",
    "maxProperties", "required", "items", "properties", "additionalProperties", "anyOf", "oneOf", "allOf", "not",
    "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type",
    "x-kubernetes-map-type", "x-kubernetes-list-map-keys", "x-kubernetes-embedded-resource",
}
TYPES = {"object", "array", "string", "integer", "number", "boolean"}


def _walk(node: dict[str, Any], path: str, problems: list[str], in_junctor: bool = False) -> None:
    """Kubernetes' structural-schema rules (apiextensions v1, 1.20), plus what OpenAPI v3.0 allows."""
    unknown = set(node) - ALLOWED_KEYS
    if unknown:
        problems.append(f"{path}: keywords Kubernetes does not know: {sorted(unknown)}")
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    if in_junctor:
        for banned in ("type", "default", "description", "additionalProperties", "nullable",
                       "x-kubernetes-preserve-unknown-fields"):
            if banned in node and not (int_or_string is False and banned == "type" and path.endswith("]")
                                       and node == {"type": node["type"]}):
                problems.append(f"{path}: {banned} inside anyOf/oneOf/allOf")
    elif int_or_string:
        if "type" in node:
            problems.append(f"{path}: int-or-string must not set type")
        if node.get("anyOf") not in (None, [{"type": "integer"}, {"type": "string"}]):
            problems.append(f"{path}: int-or-string anyOf must be exactly [integer, string]")
    elif node.get("type") not in TYPES:
        problems.append(f"{path}: no valid type ({node.get('type')!r})")
    if "anyOf" in node and not int_or_string:
        problems.append(f"{path}: anyOf outside an int-or-string node")
    if node.get("additionalProperties") is False or isinstance(node.get("additionalProperties"), bool):
        problems.append(f"{path}: additionalProperties must be a schema, not a boolean")
    if "additionalProperties" in node and "properties" in node:
        problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if node.get("x-kubernetes-preserve-unknown-fields") and node.get("type") != "object":
        problems.append(f"{path}: preserve-unknown-fields on a non-object")
    if isinstance(node.get("exclusiveMinimum"), (int, float)) and not isinstance(node["exclusiveMinimum"], bool):
        problems.append(f"{path}: exclusiveMinimum must be a boolean in OpenAPI v3.0")
    if node.get("uniqueItems"):
        problems.append(f"{path}: uniqueItems is forbidden")
    if "pattern" in node and re.search(r"\(\?[=!<]|\\[1-9]", node["pattern"]):
        problems.append(f"{path}: pattern uses lookaround/backreferences (not RE2)")
    if node.get("type") == "array" and not isinstance(node.get("items"), dict):
        problems.append(f"{path}: arrays need a single items schema")
    if "default" in node:
        _check_default(node, node["default"], path, problems)
    for name, sub in (node.get("properties") or {}).items():
        _walk(sub, f"{path}.{name}", problems)
    if isinstance(node.get("items"), dict):
        _walk(node["items"], f"{path}[]", problems)
    if isinstance(node.get("additionalProperties"), dict):
        _walk(node["additionalProperties"], f"{path}{{}}", problems)
    for junctor in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(node.get(junctor) or []):
            _walk(sub, f"{path}.{junctor}[{i}]", problems, in_junctor=True)


def _check_default(node: dict[str, Any], default: Any, path: str, problems: list[str]) -> None:
    """The API server validates defaults against the schema (and prunes them); check the cheap parts."""
    kind = node.get("type")
    expected = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict,
                "array": list}.get(kind)
    if expected and not isinstance(default, expected):
        problems.append(f"{path}: default {default!r} is not a {kind}")
    if "enum" in node and default not in node["enum"]:
        problems.append(f"{path}: default {default!r} not in enum")
    if "pattern" in node and isinstance(default, str) and not re.search(node["pattern"], default):
        problems.append(f"{path}: default {default!r} does not match its pattern")
    if kind == "object" and default == {} and node.get("required"):
        problems.append(f"{path}: default {{}} lacks required fields {node['required']}")
    if "minimum" in node and isinstance(default, (int, float)) and default < node["minimum"]:
        problems.append(f"{path}: default below minimum")


def test_schema_is_structural() -> None:
    problems: list[str] = []
    _walk(openapi_schema(), "openAPIV3Schema", problems)
    assert problems == []


def test_no_defaults_in_metadata_and_no_refs_anywhere() -> None:
    schema = openapi_schema()
    assert schema["properties"]["metadata"] == {"type": "object"}
    text = yaml.safe_dump(schema)
    for banned in ("$ref", "$defs", "definitions", "nullable", "title:", "const:", "&id"):
        assert banned not in text, banned


def test_walker_catches_violations() -> None:
    problems: list[str] = []
    _walk({"type": "object", "additionalProperties": False, "properties": {
        "a": {"$ref": "#/x"}, "b": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "c": {"type": "string", "default": 3}, "d": {"type": "integer", "exclusiveMinimum": 0},
    }}, "root", problems)
    text = "\n".join(problems)
    for fragment in ("additionalProperties must be a schema", "root.a: keywords", "root.b: no valid type",
                     "default 3 is not a string", "exclusiveMinimum must be a boolean"):
        assert fragment in text


def test_crd_shape() -> None:
    crd = build_crd()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1" and crd["metadata"]["name"] == "llmservices.baton.dev"
    spec = crd["spec"]
    assert spec["group"] == "baton.dev" and spec["scope"] == "Namespaced"
    assert spec["names"] == {"kind": "LLMService", "listKind": "LLMServiceList", "plural": "llmservices",
                             "singular": "llmservice", "shortNames": ["llms", "llmsvc"], "categories": ["baton"]}
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}  # no scale subresource: two pools, see crd.py
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Ready", "Prefill", "Decode", "TTFT-P90", "TPOT-P90", "SLO", "Age"]


def test_printer_columns_point_at_status_fields() -> None:
    schema = openapi_schema()
    for column in PRINTER_COLUMNS:
        path = column["jsonPath"]
        if path.startswith(".metadata") or "[?(" in path:
            continue
        node = schema
        for part in path.strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == column["type"] or (column["type"] == "number" and node["type"] == "number"), path


def test_defaults_fill_nested_objects_and_leave_lists_alone() -> None:
    spec = openapi_schema()["properties"]["spec"]["properties"]
    assert spec["slo"]["default"] == {} and spec["slo"]["properties"]["ttft"]["default"] == "500ms"
    assert spec["prefill"]["properties"]["autoscaling"]["default"] == {}
    assert "default" not in spec["prefill"]["properties"]["tolerations"]
    assert "default" not in spec["model"]
    affinity = spec["prefill"]["properties"]["affinity"]
    assert affinity["type"] == "object" and affinity["x-kubernetes-preserve-unknown-fields"] is True
    assert spec["decode"]["properties"]["resources"]["properties"]["limits"]["additionalProperties"][
        "x-kubernetes-int-or-string"] is True
    assert spec["autoscaling"]["properties"]["prometheusURL"]["type"] == "string"
    assert spec["model"]["properties"]["maxModelLen"] == {
        "type": "integer", "description": spec["model"]["properties"]["maxModelLen"]["description"],
        "minimum": 0, "exclusiveMinimum": True}


def test_status_schema_has_no_patterns() -> None:
    assert "pattern" not in yaml.safe_dump(openapi_schema()["properties"]["status"])


def test_committed_crd_is_up_to_date() -> None:
    assert COMMITTED.is_file(), "crds/llmservice.yaml is missing: run `baton crd`"
    assert COMMITTED.read_text(encoding="utf-8") == render_crd_yaml(), (
        "crds/llmservice.yaml is out of date with operator/api.py: run `baton crd` and commit the result")


def test_rendered_yaml_round_trips() -> None:
    assert yaml.safe_load(render_crd_yaml()) == build_crd()


def test_cli_writes_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "crd.yaml"
    assert main(["crd", "--check", "--output", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["crd", "--output", str(out)]) == 0
    assert out.read_text() == render_crd_yaml()
    assert main(["crd", "--check", "--output", str(out)]) == 0
    out.write_text(out.read_text() + "# edited\n")
    assert main(["crd", "--check", "-o", str(out)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["crd", "-o", "-"]) == 0
    assert capsys.readouterr().out == render_crd_yaml()
    assert main(["crd", "--check", "-o", "-"]) == 1
