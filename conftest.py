"""Repository-root conftest: makes the `tests` package (and tests.helpers) importable under pytest's default rootdir import mode."""
