#!/usr/bin/env python3
"""Parley's two quick-start commands, needing nothing but Python 3.11+:

    python3 dev.py serve    # install into .venv, then run Parley on http://127.0.0.1:8000
    python3 dev.py test     # install into .venv, then lint, type-check and run every test
    python3 dev.py test --fast   # the same checks, then only the fast tier of tests (< 1 min):
                                 # unit and in-process tests, no e2e processes, no browser

`test` also lints the browser UI's JavaScript with eslint, installed into node_modules/ from
package-lock.json with npm. Without Node.js and npm on PATH it says so and skips that step,
except in CI (`CI` set), where the linter must run.

Anything after the command is passed on (`python3 dev.py serve --port 9000`,
`python3 dev.py test tests/protocol -x`). Standard library only: it is what installs the rest.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
EXTRAS = {"serve": "embedded", "test": "embedded,test,load"}
NODE_MODULES = ROOT / "node_modules"
NPM_STAMP = NODE_MODULES / ".installed-lock"
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


def install_js_linter() -> list[str] | None:
    """Install eslint into node_modules/ (`npm ci`, again only when package-lock.json changed)
    and return the command that lints the UI. Without npm: None on a developer's machine (the
    quick start needs only Python), an exit with a message in CI."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        message = (
            "dev.py test lints the browser UI with eslint, which needs Node.js and npm on PATH "
            "(Debian: `apt-get install nodejs npm`)"
        )
        if os.environ.get("CI"):
            sys.exit(message + ": install them and run it again.")
        print(f"note: {message}; skipping the JavaScript lint here (CI runs it).", flush=True)
        return None
    digest = hashlib.sha256((ROOT / "package-lock.json").read_bytes()).hexdigest()
    if not (NPM_STAMP.exists() and NPM_STAMP.read_text() == digest):
        print("installing the JavaScript linter into node_modules ...", flush=True)
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=ROOT, check=True)
        NPM_STAMP.write_text(digest)
    return [node, str(NODE_MODULES / "eslint" / "bin" / "eslint.js"), "."]


def test(args: list[str]) -> int:
    if "--fast" in args:
        args = [*FAST_TIER, *(a for a in args if a != "--fast")]
    py = str(BIN / "python")
    python_checks = [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]]
    for check in python_checks:
        if code := run(check, [py, "-m", *check]):
            return code
    eslint = install_js_linter()
    if eslint is not None and (code := run(["eslint", "."], eslint)):
        return code
    return run(["pytest", *args], [py, "-m", "pytest", *args])


def run(shown: list[str], command: list[str]) -> int:
    """Run one step, printed as a person would type it (`ruff check .`, `eslint .`)."""
    print("$ " + " ".join(shown), flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    main()
