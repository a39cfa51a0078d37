def pytest_ignore_collect(collection_path, config):
    """The benchmarks run only when asked for (`make bench` passes --bench), not in `make test`."""
    if not config.getoption("bench"):
        return True
    return None
