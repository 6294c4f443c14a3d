import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import contextlib  # noqa: E402

import pytest  # noqa: E402

from relflat_ext.flatness import tail as _tail  # noqa: E402


@pytest.fixture(params=["tail", "hvp"])
def exact_strategy(request):
    """Runs a test once with the Sequential-tail propagation and once with Hessian-vector products,
    the two ways the exact path computes the output Hessians; yields the reason text to expect."""
    with (_tail.hvp_only() if request.param == "hvp" else contextlib.nullcontext()):
        yield "chain rule" if request.param == "tail" else "Hessian-vector products"
