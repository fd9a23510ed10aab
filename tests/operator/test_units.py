"""Durations and quantities: parsing, formatting, pydantic integration and the messages users see."""
from __future__ import annotations

from decimal import Decimal

import pytest
from baton.operator.units import (
    DURATION_PATTERN,
    QUANTITY_PATTERN,
    Duration,
    Quantity,
    format_cpu,
    format_duration,
    format_memory,
    parse_duration,
    parse_quantity,
)
from pydantic import BaseModel, ValidationError


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("15s", 15.0), ("2m", 120.0), ("1h30m", 5400.0), ("1.5s", 1.5), ("0s", 0.0),
    (".5s", 0.5), ("1h", 3600.0), ("250us", 0.00025), ("1µs", 1e-6), ("100ns", 1e-7), ("1m30.5s", 90.5),
    (" 15s ", 15.0), ("+3s", 3.0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("value", "fragment"), [
    ("15", "a plain number has no unit, got '15'"),
    (15, "a plain number has no unit, got 15"),
    (1.5, "a plain number has no unit"),
    ("0", "a plain number has no unit"),
    ("", "got an empty string"),
    ("-1s", "must not be negative"),
    ("1x", "units: h, m, s, ms, us, ns"),
    ("1d", "units: h, m, s, ms, us, ns"),
    ("ms", "must be a duration with a unit"),
    ("1.2.3s", "must be a duration with a unit"),
    (None, "must be a duration with a unit"),
    (True, "must be a duration with a unit"),
])
def test_parse_duration_refuses(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match="must") as info:
        parse_duration(value)  # type: ignore[arg-type]
    assert fragment in str(info.value)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.5, "500ms"), (1.5, "1.5s"), (5400, "1h30m"), (3600, "1h"), (90.5, "1m30.5s"), (0.312, "312ms"),
    (0.0125, "12.5ms"), (2.5e-5, "25us"), (3e-9, "3ns"), (15, "15s"), (7260, "2h1m"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "1s", True])
def test_format_duration_refuses(bad: object) -> None:
    with pytest.raises(ValueError, match="must"):
        format_duration(bad)  # type: ignore[arg-type]


def test_duration_pattern_agrees_with_parser() -> None:
    import re

    for good in ["500ms", "1h30m", "1.5s", "0s", "1µs"]:
        assert re.match(DURATION_PATTERN, good)
    for bad in ["500", "1x", "-1s", ""]:
        assert not re.match(DURATION_PATTERN, bad)


@pytest.mark.parametrize(("text", "value"), [
    ("500m", Decimal("0.5")), ("2", Decimal(2)), ("8Gi", Decimal(8 * 2**30)), ("512Mi", Decimal(512 * 2**20)),
    ("1G", Decimal(10**9)), ("1e3", Decimal(1000)), ("1E3", Decimal(1000)), ("1.5Gi", Decimal(3 * 2**29)),
    ("100k", Decimal(100_000)), ("1Ki", Decimal(1024)), ("250u", Decimal("0.00025")), ("5n", Decimal("5e-9")),
    (2, Decimal(2)), (0.5, Decimal("0.5")), ("0", Decimal(0)), ("-1", Decimal(-1)), ("1e-3", Decimal("0.001")),
])
def test_parse_quantity(text: str | float, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize(("bad", "fragment"), [
    ("8GB", "no 'B'"), ("8gi", "case-sensitive"), ("1.5 Gi", "must be a Kubernetes quantity"), ("", "quantity"),
    ("Gi", "quantity"), ("1Zi", "quantity"), (True, "quantity"), (None, "quantity"), (float("inf"), "quantity"),
])
def test_parse_quantity_refuses(bad: object, fragment: str) -> None:
    with pytest.raises(ValueError, match="must be a Kubernetes quantity") as info:
        parse_quantity(bad)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_format_cpu_and_memory() -> None:
    assert format_cpu(2) == "2"
    assert format_cpu(0.5) == "500m"
    assert format_cpu(Decimal("0.0001")) == "1m"
    assert format_memory(8 * 2**30) == "8Gi"
    assert format_memory(1536 * 2**20) == "1536Mi"
    assert format_memory(1000) == "1000"
    assert format_memory(0) == "0"
    with pytest.raises(ValueError):
        format_cpu(-1)
    with pytest.raises(ValueError):
        format_memory(-1)


class _M(BaseModel):
    d: Duration
    q: Quantity
    qs: dict[str, Quantity] = {}


def test_pydantic_keeps_the_users_text_and_exposes_the_value() -> None:
    m = _M.model_validate({"d": "1h30m", "q": "8Gi", "qs": {"cpu": 2, "memory": "512Mi"}})
    assert m.d == "1h30m" and m.d.seconds == 5400.0
    assert m.q == "8Gi" and m.q.bytes == 8 * 2**30
    assert m.qs["cpu"] == "2" and m.qs["cpu"].cores == 2.0
    assert m.model_dump(mode="json") == {"d": "1h30m", "q": "8Gi", "qs": {"cpu": "2", "memory": "512Mi"}}
    assert m.model_dump()["d"] == "1h30m"
    assert isinstance(Duration("15s"), str) and repr(Duration("15s")) == "Duration('15s')"
    assert Quantity("500m").value == Decimal("0.5") and repr(Quantity(1)) == "Quantity('1')"


def test_pydantic_errors_carry_the_message() -> None:
    with pytest.raises(ValidationError) as info:
        _M.model_validate({"d": "500", "q": "8GB"})
    errors = {e["loc"][0]: e["msg"] for e in info.value.errors()}
    assert "a plain number has no unit" in errors["d"]
    assert "must be a Kubernetes quantity" in errors["q"]


def test_json_schema() -> None:
    schema = _M.model_json_schema()
    d = schema["properties"]["d"]
    assert d["type"] == "string" and d["pattern"] == DURATION_PATTERN
    q = schema["properties"]["q"]
    assert q["x-kubernetes-int-or-string"] is True
    assert q["anyOf"] == [{"type": "integer"}, {"type": "string"}] and q["pattern"] == QUANTITY_PATTERN
