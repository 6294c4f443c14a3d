import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-size", choices=["small", "full"], default="small",
                     help="small: CI-sized cases; full: the sizes of the performance targets")
    parser.addoption("--device", choices=["cpu", "cuda"], default="cpu", help="device the benchmarks run on")


@pytest.fixture(scope="session")
def full(request):
    return request.config.getoption("--bench-size") == "full"


@pytest.fixture(scope="session")
def device(request):
    dev = request.config.getoption("--device")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda but no GPU is visible")
    return torch.device(dev)
