"""Process wiring: configuration, the runtime that starts each role, the Litestar app, the
`parley` command line."""
