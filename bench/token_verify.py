"""Verification cost of a new token (µs per verify), timeit-style: HS256 with the local secret
beside RS256, ES256 and EdDSA from a JWKS (keys already fetched; the cache of verified tokens
is bypassed, so each verify does the signature and claims checks). The CPU time beside the
wall time is the figure to trust on a loaded machine.

    .venv/bin/python bench/token_verify.py
"""

from __future__ import annotations

import asyncio
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jwt

from server.app.config import AuthSettings, Settings
from server.edge.auth import Verifier
from server.edge.issuers import resolve
from tests.helpers.idp import LocalIdP, Signer

SECRET = "b" * 40
ROUNDS = 2000


async def main() -> None:
    signers = {"RS256": Signer.rsa(), "ES256": Signer.ec(), "EdDSA": Signer.ed25519()}
    idp = LocalIdP(list(signers.values())).start()
    settings = Settings(auth=AuthSettings(jwks_url=f"{idp.base}/bench/jwks.json"))
    verifier = Verifier(settings.auth, SECRET, resolve(settings))
    exp = time.time() + 3600
    tokens = {"HS256": jwt.encode({"sub": "u", "exp": exp}, SECRET, algorithm="HS256")}
    tokens |= {alg: s.sign({"sub": "u", "exp": exp}) for alg, s in signers.items()}
    try:
        for alg, token in tokens.items():
            await verifier.verify(token)  # fetch the key set once

            async def fresh(token: str = token) -> None:
                verifier._cache.clear()  # a new token every time
                await verifier.verify(token)

            started, cpu = timeit.default_timer(), time.process_time()
            for _ in range(ROUNDS):
                await fresh()
            per = (timeit.default_timer() - started) / ROUNDS * 1e6
            per_cpu = (time.process_time() - cpu) / ROUNDS * 1e6
            print(f"{alg:6} {per:8.1f} µs per verify ({per_cpu:.1f} µs of CPU)")
    finally:
        await verifier.close()
        idp.stop()


if __name__ == "__main__":
    asyncio.run(main())
