"""The frozen-config builder converts types and refuses unknown keys."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from flashportrait.config import ConfigError, from_mapping, to_mapping


@dataclass(frozen=True)
class Inner:
    width: int
    scale: float = 1.0


@dataclass(frozen=True)
class Outer:
    name: str
    patch: tuple[int, int, int]
    widths: tuple[int, ...] = (1, 2)
    inner: Inner | None = None
    flag: bool = False


def test_builds_nested_and_tuples():
    cfg = from_mapping(
        Outer, {"name": "x", "patch": [1, 2, 2], "widths": [3], "inner": {"width": "4"}, "flag": "true"}
    )
    assert cfg == Outer("x", (1, 2, 2), (3,), Inner(4, 1.0), True)
    assert to_mapping(cfg) == {
        "name": "x",
        "patch": [1, 2, 2],
        "widths": [3],
        "inner": {"width": 4, "scale": 1.0},
        "flag": True,
    }


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key.*'pach'"):
        from_mapping(Outer, {"name": "x", "pach": [1, 2, 2]})


def test_missing_and_wrong_type():
    with pytest.raises(ConfigError, match=r"missing required key.*patch"):
        from_mapping(Outer, {"name": "x"})
    with pytest.raises(ConfigError, match=r"Outer.patch.*3 values"):
        from_mapping(Outer, {"name": "x", "patch": [1, 2]})
    with pytest.raises(ConfigError, match="expected an integer"):
        from_mapping(Outer, {"name": "x", "patch": [1, 2, "a"]})
