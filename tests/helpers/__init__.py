"""What tests and benchmarks share, none of it a fixture or a test.

    auth.py           tokens: the test secret, `mint`, fresh user names
    processes.py      embedded services and Parley processes (`ParleyProcess`, `Cluster`, the
                      2 web + 2 worker `Scaled` cluster, the standalone model)
    conversations.py  a conversation over one `Client`: start, say, transcript, seq checks,
                      what PostgreSQL holds
    tabs.py           `TabClient`: a browser tab's view over many sockets, replayed like a client
    procfs.py         /proc sampling: RSS, CPU seconds, kernel send queues, process trees
    faults.py         `Proxy`: a TCP link that pauses, cuts, refuses (or refuses upgrades)
    browser.py        the UI tests' Chromium page (`TabClient`, `open_tab`), Playwright only

Fixtures live in the conftest.py files; tests import from here, never from another test
module. The benchmarks in bench/ import from here too (run them as `python -m bench.<name>`
from the repository root, which puts `tests` on the import path).
"""
