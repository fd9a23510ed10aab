"""Admission review: every bad manifest under bad/ is refused with a message that names its field."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from baton.operator.admission import review

HERE = Path(__file__).resolve().parent
BAD = sorted((HERE / "bad").glob("*.yaml"))
EXAMPLES = sorted((HERE.parents[1] / "examples").glob("*.yaml"))


def _header(path: Path, key: str) -> str:
    match = re.search(rf"^# {key}: (.+)$", path.read_text(), re.MULTILINE)
    assert match, f"{path.name} lacks a '# {key}: ...' line"
    return match.group(1).strip()


def test_enough_bad_manifests() -> None:
    assert len(BAD) >= 12


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_manifest_is_refused_naming_the_field(path: Path) -> None:
    field, expect = _header(path, "field"), _header(path, "expect")
    problems = review(yaml.safe_load(path.read_text()), None)
    assert problems, f"{path.name} was accepted"
    matching = [p for p in problems if p.startswith(f"{field}: ") and expect in p]
    assert matching, f"{path.name}: no problem names {field!r} with {expect!r}; got {problems}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_admitted(path: Path) -> None:
    assert review(yaml.safe_load(path.read_text()), None) == []


def test_update_is_reviewed_like_create() -> None:
    good = yaml.safe_load(EXAMPLES[0].read_text())
    bad = copy.deepcopy(good)
    bad["spec"]["decode"]["tensorParallel"] = 3
    assert review(bad, good) == ["spec.decode.tensorParallel: must be a power of two (1, 2, 4, ...), got 3"]


def test_metadata_only_update_of_an_old_spec_is_not_blocked() -> None:
    # Admitted by an older Baton (or before the webhook existed): the operator must still add finalizers.
    legacy = yaml.safe_load((HERE / "bad" / "tp-not-power-of-two.yaml").read_text())
    updated = copy.deepcopy(legacy)
    updated["metadata"]["finalizers"] = ["baton.dev/cleanup"]
    assert review(updated, legacy) == []
    assert review(updated, None) != []


def test_objects_being_deleted_are_never_refused() -> None:
    bad = yaml.safe_load((HERE / "bad" / "negative-replicas.yaml").read_text())
    bad["metadata"]["deletionTimestamp"] = "2024-05-01T12:00:00Z"
    assert review(bad, bad) == []


@pytest.mark.parametrize("garbage", [None, [], "x", {"spec": {"model": []}}])
def test_review_never_raises(garbage: object) -> None:
    problems = review(garbage, None)  # type: ignore[arg-type]
    assert problems and all(isinstance(p, str) for p in problems)
