"""osvmm/records.py: Record and Frozen behave as the dataclasses they replace."""

from __future__ import annotations

import pytest

from osvmm.records import Frozen, Record


class Point(Frozen):
    x: int
    y: int = 0
    tags: tuple = ()


class Box(Record):
    name: str
    size: int = 1


class Normalised(Frozen):
    ids: tuple

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(self.ids))


class Point3(Point):
    z: int = 0


def test_fields_by_position_and_name_with_defaults():
    p = Point(1, tags=("a",))
    assert (p.x, p.y, p.tags) == (1, 0, ("a",))
    assert Point._fields == ("x", "y", "tags")
    assert Point(y=2, x=1) == Point(1, 2)


def test_bad_calls_are_type_errors():
    with pytest.raises(TypeError, match="field 'x' is missing"):
        Point()
    with pytest.raises(TypeError, match="no field 'w'"):
        Point(1, w=2)
    with pytest.raises(TypeError, match="given twice"):
        Point(1, x=2)
    with pytest.raises(TypeError, match="takes 3 fields, not 4"):
        Point(1, 2, (), 4)


def test_mutable_default_and_order_refused_when_the_class_is_made():
    with pytest.raises(TypeError, match="mutable default"):

        class Bad(Record):
            items: list = []  # noqa: RUF012 (the case under test)

    with pytest.raises(TypeError, match="without a default after one with"):

        class Bad2(Record):
            a: int = 0
            b: int


def test_frozen_is_immutable_and_hashable():
    p = Point(1, 2)
    with pytest.raises(AttributeError, match="immutable"):
        p.x = 3
    with pytest.raises(AttributeError, match="immutable"):
        del p.y
    assert hash(p) == hash(Point(1, 2))
    assert len({p, Point(1, 2), Point(2, 1)}) == 2


def test_record_is_mutable_and_not_hashable():
    b = Box("a")
    b.size = 5
    assert b == Box("a", 5)
    assert b != Box("a", 6)
    with pytest.raises(TypeError):
        hash(b)


def test_equality_needs_the_same_class():
    assert Point(1, 0) != Point3(1, 0)
    assert Point(1) != (1, 0, ())


def test_post_init_and_inheritance():
    assert Normalised([1, 2]).ids == (1, 2)
    p = Point3(1, 2, (), 3)
    assert Point3._fields == ("x", "y", "tags", "z")
    assert (p.x, p.z) == (1, 3)


def test_repr_shows_the_fields():
    assert repr(Point(1, 2)) == "Point(x=1, y=2, tags=())"
