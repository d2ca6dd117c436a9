#!/usr/bin/env python3
"""Parley's two quick-start commands, needing nothing but Python 3.11+:

    python3 dev.py serve    # install into .venv, then run Parley on http://127.0.0.1:8000
    python3 dev.py test     # install into .venv, then lint, type-check and run every test
    python3 dev.py test --fast   # the same checks, then only the fast tier of tests (< 1 min):
                                 # unit and in-process tests, no e2e processes, no browser

Anything after the command is passed on (`python3 dev.py serve --port 9000`,
`python3 dev.py test tests/protocol -x`). Standard library only: it is what installs the rest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
EXTRAS = {"serve": "embedded", "test": "embedded,test,load"}
FAST_TIER = ["-m", "not e2e and not ui and not soak"]  # markers set by tests/conftest.py


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in EXTRAS:
        sys.exit(__doc__)
    command, rest = sys.argv[1], sys.argv[2:]
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py runs on whatever python3 is
        sys.exit("Parley needs Python 3.11 or newer")
    install(EXTRAS[command])
    if command == "serve":
        os.execv(BIN / "parley", [str(BIN / "parley"), "serve", *rest])
    sys.exit(test(rest))


def install(extras: str) -> None:
    """Create .venv and install Parley into it, again only when pyproject.toml changed."""
    if not (BIN / "python").exists():
        print("creating .venv ...", flush=True)
        venv.create(VENV, with_pip=True)
    stamp = VENV / f".installed-{extras.replace(',', '-')}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    print(f"installing Parley [{extras}] into .venv ...", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "-e", f".[{extras}]"], cwd=ROOT, check=True)
    stamp.write_text(digest)


def test(args: list[str]) -> int:
    if "--fast" in args:
        args = [*FAST_TIER, *(a for a in args if a != "--fast")]
    py = str(BIN / "python")
    steps = [
        [py, "-m", "ruff", "check", "."],
        [py, "-m", "ruff", "format", "--check", "."],
        [py, "-m", "mypy"],
        [py, "-m", "pytest", *args],
    ]
    for step in steps:
        print("$ " + " ".join(step[2:] if step[0] == py else step), flush=True)
        code = subprocess.run(step, cwd=ROOT).returncode
        if code:
            return code
    return 0


if __name__ == "__main__":
    main()
