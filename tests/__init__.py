"""liverseg's tests (a regular package: a wheel that ships a top-level `tests`, as rt-utils
does, must not shadow it)."""
