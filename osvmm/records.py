"""Record and Frozen: the data classes on ``osvmm run``'s path, declared as a
dataclass is and made without compiling code.

    class E820Entry(Frozen):
        addr: int
        size: int
        type: int = E820_RAM

The annotated names of the class body, in order, are its fields, after those of
its base classes; a value given in the body is the field's default. The
constructor takes the fields by position or by name, then calls the class's
``__post_init__`` if it has one. Two records are equal when they are of the same
class and their fields are equal; ``repr`` shows the fields. A ``Frozen`` record
is immutable once made (its ``__post_init__`` may still normalise fields with
``object.__setattr__``, as a frozen dataclass's does) and hashable.

A default is shared by every record made without that field, so a mutable one
(a list, dict, set or bytearray) is refused when the class is made.

Why not ``dataclasses``: a dataclass compiles the source of its generated
methods when its module is imported, about 1.2 ms a class on the hosts we
measure, and importing ``dataclasses`` brings ``inspect``, ``ast``, ``dis`` and
``tokenize``. For the 16 classes of a run that was a fifth of ``osvmm run``'s
cold start (docs/performance.md, "Cold start"). A Record class costs what a
plain class costs to make; making a record takes a few microseconds more than
a dataclass's compiled ``__init__``, which the run path does a few dozen times.
Modules that a run does not import (the plan, ``osvmm up``) use dataclasses.
"""

from __future__ import annotations

_MUTABLE = (list, dict, set, bytearray)


class Record:
    """A mutable record (above): fields, defaults, ``__post_init__``, eq, repr."""

    _fields: tuple[str, ...] = ()
    _defaults: dict = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        own = tuple(cls.__dict__.get("__annotations__", {}))
        defaults = dict(cls._defaults)
        for name in own:
            if name in cls.__dict__:
                value = cls.__dict__[name]
                if isinstance(value, _MUTABLE):
                    raise TypeError(
                        f"{cls.__name__}.{name}: a mutable default ({type(value).__name__}) "
                        "would be shared by every record"
                    )
                defaults[name] = value
            elif defaults:
                raise TypeError(f"{cls.__name__}.{name}: a field without a default after one with")
        cls._fields = tuple(f for f in cls._fields if f not in own) + own
        cls._defaults = defaults

    def __init__(self, *args, **kwargs) -> None:
        fields = self._fields
        name = type(self).__name__
        if len(args) > len(fields):
            raise TypeError(f"{name} takes {len(fields)} fields, not {len(args)}")
        values = dict(zip(fields, args, strict=False))  # the rest by name or default
        for key, value in kwargs.items():
            if key not in fields:
                raise TypeError(f"{name} has no field {key!r}")
            if key in values:
                raise TypeError(f"{name}: field {key!r} given twice")
            values[key] = value
        setter = object.__setattr__  # a Frozen's own __setattr__ refuses
        defaults = self._defaults
        for field in fields:
            if field in values:
                setter(self, field, values[field])
            elif field in defaults:
                setter(self, field, defaults[field])
            else:
                raise TypeError(f"{name}: field {field!r} is missing")
        post = getattr(self, "__post_init__", None)
        if post is not None:
            post()

    def _values(self) -> tuple:
        return tuple(getattr(self, f) for f in self._fields)

    def __eq__(self, other) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # mutable: not a dict key

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({fields})"


class Frozen(Record):
    """An immutable, hashable record (above)."""

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: {name} cannot be set")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: {name} cannot be deleted")

    def __hash__(self) -> int:
        return hash(self._values())
