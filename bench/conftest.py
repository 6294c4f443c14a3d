import pytest


def pytest_addoption(parser):
    parser.addoption("--bench-size", choices=["small", "full"], default="small",
                     help="small: CI-sized cases; full: the sizes of the performance targets")


@pytest.fixture(scope="session")
def full(request):
    return request.config.getoption("--bench-size") == "full"
