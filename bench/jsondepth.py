"""Cost of `protocol.jsondepth.too_deep` per KiB on typical and hostile texts.

Run: .venv/bin/python -m bench.jsondepth
"""

from __future__ import annotations

import json
import timeit

from protocol.jsondepth import depth, too_deep

CASES = {
    "say frame, 1 KiB (count only)": json.dumps(
        {"type": "say", "conversation": "c" * 36, "text": "hello " * 160}
    ).encode()[:1024],
    "1 KiB of [": b"[" * 1024,
    '1 KiB of {"a":': (b'{"a":' * 205)[:1024],
    "1 KiB, strings holding brackets": json.dumps(["[{x}]"] * 150).encode()[:1024],
    "256 KiB of [": b"[" * 262_144,
    "256 KiB, strings holding brackets": json.dumps(["a[b{c" * 10] * 5000).encode()[:262_144],
}


def main() -> None:
    for name, data in CASES.items():
        runs = 2000 if len(data) < 4096 else 20
        seconds = min(timeit.repeat(lambda d=data: too_deep(d), number=runs, repeat=3)) / runs
        per_kib = seconds * 1e6 / (len(data) / 1024)
        print(
            f"{name:36s} {len(data):7d} B {seconds * 1e6:9.1f} µs {per_kib:7.2f} µs/KiB"
            f"  depth {depth(data)}"
        )


if __name__ == "__main__":
    main()
