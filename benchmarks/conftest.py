import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    from cli import keep_freed_memory
    keep_freed_memory()  # as the scripts do: CPU speed (cli.keep_freed_memory)


def pytest_collection_modifyitems(config, items):
    """Benchmarks run only with --benchmark-only (so `pytest` alone never pays for them)."""
    if not config.getoption("--benchmark-only", default=False):
        import pytest
        for item in items:
            item.add_marker(pytest.mark.skip(reason="benchmark: run with `pytest benchmarks --benchmark-only`"))
