"""Field checks for the stdlib dataclasses of the model worker's wire.

The worker stays free of pydantic (`agent.wire.worker`), so its wire classes
check their own fields in `__post_init__` with these helpers. Each raises
ValueError naming the field, the rule and the value; pydantic, where it
validates the same classes in the API process, reports it as a validation error.
"""

from __future__ import annotations


def expect(obj: object, name: str, *kinds: type, optional: bool = False) -> None:
    """`obj.name` is an instance of one of `kinds` (a bool is not an int here), or None if optional."""
    value = getattr(obj, name)
    if value is None and optional:
        return
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        wanted = " or ".join(k.__name__ for k in kinds) + (" or None" if optional else "")
        raise ValueError(f"{name} must be {wanted}, not {type(value).__name__} {value!r}")


def expect_items(obj: object, name: str, kind: type, *, optional: bool = False, max_items: int | None = None) -> None:
    """`obj.name` is a list of `kind` (at most `max_items`), or None if optional."""
    value = getattr(obj, name)
    if value is None and optional:
        return
    if not isinstance(value, list) or not all(isinstance(item, kind) for item in value):
        raise ValueError(f"{name} must be a list of {kind.__name__}, not {value!r}")
    if max_items is not None and len(value) > max_items:
        raise ValueError(f"{name} takes at most {max_items} items, not {len(value)}")


def number(obj: object, name: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           integer: bool = False, optional: bool = False) -> None:
    """`obj.name` is a number (an int if `integer`) within the bounds, or None if optional."""
    value = getattr(obj, name)
    if value is None and optional:
        return
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    is_number = isinstance(value, kinds) and not isinstance(value, bool)
    if (not is_number or (ge is not None and value < ge) or (gt is not None and value <= gt)
            or (le is not None and value > le)):
        bounds = [f"{op} {v}" for op, v in ((">=", ge), (">", gt), ("<=", le)) if v is not None]
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'} {' and '.join(bounds)}, "
                         f"not {value!r}")
