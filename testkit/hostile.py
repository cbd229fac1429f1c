"""Hostile JSON payloads for every ingress: generated, seeded, reproducible.

Each payload is what an attacker with publish rights (or a broken peer) can send: deep
nesting, integers longer than Python converts, NaN and Infinity, invalid UTF-8, sizes at
and over the caps, wrong types in every field of a valid object, unknown schema versions,
random bytes. `hostile_payloads(n, valid=...)` mixes them around a valid example, so the
fields a parser really reads are the ones attacked.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

_WRONG_VALUES: list[Any] = [None, True, -1, 0, 2**63, -(2**63) - 1, 1e308, -1e-308, "", "x" * 300, [], {}, [1, "a"],
                            {"a": {"b": None}}, "\u0000", "\ud83d", "ü" * 50, 3.5]


def _deep(depth: int, opener: str, closer: str) -> bytes:
    return (opener * depth + closer * depth).encode()


def hostile_payloads(n: int, valid: dict[str, Any], *, cap_bytes: int = 16 * 1024,
                     seed: int = 0) -> Iterator[bytes]:
    """`n` hostile payloads around the valid object `valid` (a dict with `schema_version`)."""
    rng = random.Random(seed)
    keys = list(valid)
    makers = [
        lambda: _deep(rng.randint(500, 5000), "[", "]"),
        lambda: _deep(rng.randint(500, 3000), '{"a":', "}").replace(b"}", b"1}", 1),
        lambda: b'{"schema_version": 1, "x": ' + b"9" * rng.randint(4301, 12000) + b"}",
        lambda: json.dumps({**valid, rng.choice(keys): "NaN"}).replace('"NaN"', rng.choice(
            ["NaN", "Infinity", "-Infinity"])).encode(),
        lambda: bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))),
        lambda: json.dumps(valid).encode()[: rng.randint(0, 40)] + b"\xff\xfe\xc3\x28",
        lambda: b'{"schema_version": 1, "pad": "' + b"x" * (cap_bytes - 32 + rng.randint(0, 64)) + b'"}',
        lambda: json.dumps({**valid, "schema_version": rng.choice([0, 2, "1", 1.0, None, -1, 10**30])}).encode(),
        lambda: json.dumps({**valid, rng.choice(keys): rng.choice(_WRONG_VALUES)}).encode(),
        lambda: json.dumps({**valid, f"extra_{rng.randint(0, 9)}": 1}).encode(),
        lambda: json.dumps({k: v for k, v in valid.items() if k != rng.choice(keys)}).encode(),
        lambda: json.dumps(rng.choice([[valid], "string", 42, None, True])).encode(),
        lambda: json.dumps(valid).encode() + b" trailing",
        lambda: b"\xef\xbb\xbf" + json.dumps(valid).encode(),  # a UTF-8 byte order mark
    ]
    for i in range(n):
        yield makers[i % len(makers)]()
