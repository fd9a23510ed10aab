"""Kubernetes-style durations (`500ms`, `1h30m`) and quantities (`500m`, `8Gi`) for the LLMService API.

Users write these as strings in YAML and expect to read the same strings back (`kubectl get -o yaml` must not
turn `8Gi` into `8589934592`), but the operator needs numbers. So `Duration` and `Quantity` are `str`
subclasses: they keep the user's text, validate it once at parse time, and expose the number as a property.
Both plug into pydantic (validation + JSON schema) so the CRD schema is generated from the same definition.

Pure: no Kubernetes client, no I/O.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Self

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

# --------------------------------------------------------------------------------------------- durations

#: Seconds per unit, as Go's time.ParseDuration (what Kubernetes uses for metav1.Duration) understands them.
DURATION_UNITS: dict[str, Decimal] = {
    "ns": Decimal("1e-9"),
    "us": Decimal("1e-6"),
    "µs": Decimal("1e-6"),
    "ms": Decimal("1e-3"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_UNIT = r"(?:ns|us|µs|ms|s|m|h)"
#: Anchored regular expression for a non-negative duration; RE2-compatible so the CRD can use it as `pattern`.
DURATION_PATTERN = rf"^(?:{_NUMBER}{_UNIT})+$"
_DURATION_PART = re.compile(rf"({_NUMBER})({_UNIT})")
_DURATION_FULL = re.compile(DURATION_PATTERN)
_DURATION_EXAMPLE = "a duration with a unit, like 500ms, 15s, 2m or 1h30m"


def parse_duration(text: str) -> float:
    """Seconds in `text` (`500ms` -> 0.5, `1h30m` -> 5400.0).

    Plain numbers are refused on purpose: `ttft: 500` could mean seconds or milliseconds, and guessing wrong
    by a factor of 1000 is the worst kind of silent misconfiguration. Negative durations are refused too: no
    field of the API has a use for them.
    """
    if isinstance(text, bool) or not isinstance(text, str):
        if isinstance(text, (int, float)):
            raise ValueError(f"must be {_DURATION_EXAMPLE}; a plain number has no unit, got {text!r}")  # noqa: TRY004
        raise ValueError(f"must be {_DURATION_EXAMPLE}, got {text!r}")  # noqa: TRY004 (pydantic wants ValueError)
    s = text.strip()
    if not s:
        raise ValueError(f"must be {_DURATION_EXAMPLE}, got an empty string")
    if s.startswith("-"):
        raise ValueError(f"must not be negative, got {text!r}")
    s = s.removeprefix("+")
    if re.fullmatch(_NUMBER, s):
        raise ValueError(f"must be {_DURATION_EXAMPLE}; a plain number has no unit, got {text!r}")
    if not _DURATION_FULL.fullmatch(s):
        raise ValueError(
            f"must be {_DURATION_EXAMPLE} (units: h, m, s, ms, us, ns), got {text!r}"
        )
    total = sum(Decimal(num) * DURATION_UNITS[unit] for num, unit in _DURATION_PART.findall(s))
    return float(total)


def format_duration(seconds: float) -> str:
    """The shortest readable duration for `seconds`: 5400 -> `1h30m`, 0.5 -> `500ms`, 1.5 -> `1.5s`.

    Used for status fields (`ttftP90: 312ms`) that people read in `kubectl get`. Round-trips through
    `parse_duration` up to nanosecond precision.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise ValueError(f"must be a finite number of seconds, got {seconds!r}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {seconds!r}")
    ns = round(Decimal(repr(float(seconds))) * Decimal(10**9))
    if ns == 0:
        return "0s"
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{_trim(Decimal(ns) / 1000)}us"
    if ns < 1_000_000_000:
        return f"{_trim(Decimal(ns) / 1_000_000)}ms"
    hours, rest = divmod(ns, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    out = ""
    if hours:
        out += f"{hours}h"
    if minutes:
        out += f"{minutes}m"
    if rest:
        out += f"{_trim(Decimal(rest) / 10**9)}s"
    return out


def _trim(d: Decimal) -> str:
    """Decimal without trailing zeros or exponent: 1.500 -> `1.5`, 2.0 -> `2`."""
    text = format(d.normalize(), "f")
    return text


class _CheckedText(str):
    """A string that must parse as a unit (`_parse`); pydantic validates it with that parser's message and
    serialises it verbatim. Subclasses say how to parse, and which JSON schema the CRD gets."""

    __slots__ = ()
    _error_type = "value"

    @staticmethod
    def _parse(value: Any) -> object:
        raise NotImplementedError

    @classmethod
    def _validate(cls, value: Any) -> Self:
        if isinstance(value, cls):
            return value
        try:
            cls._parse(value)
        except ValueError as exc:
            raise PydanticCustomError(cls._error_type, str(exc)) from None
        return cls(value)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(str, when_used="always"),
        )


class Duration(_CheckedText):
    """A duration string such as `500ms`, kept verbatim; `.seconds` is its value as a float."""

    __slots__ = ()

    def __new__(cls, text: str) -> Self:
        parse_duration(text)  # raises ValueError with a user-facing message
        return super().__new__(cls, text.strip())

    @property
    def seconds(self) -> float:
        """The duration in seconds."""
        return parse_duration(str(self))

    def __repr__(self) -> str:
        return f"Duration({str(self)!r})"

    _error_type = "duration"
    _parse = staticmethod(parse_duration)

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "pattern": DURATION_PATTERN}


# --------------------------------------------------------------------------------------------- quantities

#: Multipliers of Kubernetes quantity suffixes (k8s.io/apimachinery/pkg/api/resource).
QUANTITY_SUFFIXES: dict[str, Decimal] = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}
#: Kubernetes' own quantity grammar (what controller-gen puts in CRDs for resource.Quantity); RE2-compatible.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:([KMGTPE]i|[numkMGTPE])|[eE]([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)))?$"
)
_QUANTITY_EXAMPLE = "a Kubernetes quantity, like 500m or 2 (CPU) or 512Mi, 8Gi or 1G (memory)"


def parse_quantity(text: str | float) -> Decimal:
    """Exact value of a quantity in base units (cores for CPU, bytes for memory): `500m` -> 0.5, `1Ki` -> 1024.

    Decimal, not float, because `0.1 + 0.2` style errors in resource arithmetic show up as `300000001n` in
    pod specs. Integers and floats are accepted because YAML turns `cpu: 2` into an int.
    """
    if isinstance(text, bool):
        raise ValueError(f"must be {_QUANTITY_EXAMPLE}, got {text!r}")  # noqa: TRY004 (pydantic wants ValueError)
    if isinstance(text, int):
        return Decimal(text)
    if isinstance(text, float):
        if not math.isfinite(text):
            raise ValueError(f"must be {_QUANTITY_EXAMPLE}, got {text!r}")
        return Decimal(repr(text))
    if not isinstance(text, str):
        raise ValueError(f"must be {_QUANTITY_EXAMPLE}, got {text!r}")  # noqa: TRY004
    m = _QUANTITY.match(text.strip())
    if not m:
        hint = ""
        low = text.strip()
        if re.fullmatch(r"[0-9.]+\s*(gb|gib|mb|mib|kb|kib|g|mi|gi)", low, re.IGNORECASE):
            hint = " (suffixes are case-sensitive: Ki, Mi, Gi, Ti or k, M, G, T; no 'B')"
        raise ValueError(f"must be {_QUANTITY_EXAMPLE}{hint}, got {text!r}")
    number, suffix, exponent = m.groups()
    try:
        value = Decimal(number)
        if exponent is not None:
            value = value.scaleb(int(Decimal(exponent)))
        else:
            value *= QUANTITY_SUFFIXES[suffix or ""]
    except (InvalidOperation, ValueError):
        raise ValueError(f"must be {_QUANTITY_EXAMPLE}, got {text!r}") from None
    return value


def format_cpu(cores: float | Decimal) -> str:
    """CPU cores as Kubernetes writes them: 2 -> `2`, 0.5 -> `500m`, 0.0001 -> `1m` (rounded up)."""
    d = Decimal(repr(cores)) if isinstance(cores, float) else Decimal(cores)
    if d < 0:
        raise ValueError(f"must not be negative, got {cores!r}")
    if d == d.to_integral_value():
        return str(int(d))
    milli = (d * 1000).to_integral_value(rounding="ROUND_CEILING")
    return f"{int(milli)}m"


def format_memory(num_bytes: float | Decimal) -> str:
    """Bytes with the largest exact binary suffix: 8 * 2**30 -> `8Gi`, 1536 * 2**20 -> `1536Mi`, 1000 -> `1000`."""
    d = Decimal(repr(num_bytes)) if isinstance(num_bytes, float) else Decimal(num_bytes)
    if d < 0:
        raise ValueError(f"must not be negative, got {num_bytes!r}")
    n = int(d.to_integral_value(rounding="ROUND_CEILING"))
    if n == 0:
        return "0"
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = int(QUANTITY_SUFFIXES[suffix])
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


class Quantity(_CheckedText):
    """A quantity string such as `8Gi` or `500m`, kept verbatim; `.value` is the exact number in base units.

    `Quantity(2)` (from YAML `cpu: 2`) becomes `"2"`: Kubernetes accepts either form and strings compare
    predictably.
    """

    __slots__ = ()

    def __new__(cls, text: str | float) -> Self:
        parse_quantity(text)
        return super().__new__(cls, text.strip() if isinstance(text, str) else _number_text(text))

    @property
    def value(self) -> Decimal:
        """Exact value in base units (cores or bytes)."""
        return parse_quantity(str(self))

    @property
    def cores(self) -> float:
        """The value read as CPU cores."""
        return float(self.value)

    @property
    def bytes(self) -> int:
        """The value read as bytes, rounded up the way Kubernetes rounds memory."""
        return int(self.value.to_integral_value(rounding="ROUND_CEILING"))

    def __repr__(self) -> str:
        return f"Quantity({str(self)!r})"

    _error_type = "quantity"
    _parse = staticmethod(parse_quantity)

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        # Exactly what Kubernetes' own CRDs use for resource.Quantity: an int-or-string with the grammar.
        return {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }


def _number_text(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return _trim(Decimal(repr(value)))
