"""Data-parallel runs: 2 gloo processes on CPU, each with half the data, give the single-process
result on all of it (exact paths to 1e-10 in float64; the stochastic estimator with shared probes)."""
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import relflat_ext as rf
from testing import gloo_group

HERE = os.path.dirname(os.path.abspath(__file__))


def _setup():
    sys.path.insert(0, HERE)
    from models import data, mlp
    model = mlp([6, 8, 7, 4], "tanh", seed=0)
    x, y = data(90, 6, 4, "cross_entropy", seed=0)
    return model, x, y


def _measure(model, x, y):
    return {
        "closed_form": rf.relative_flatness(model, "4", x, y, lmax=True).kappa,
        "closed_form_lmax": rf.relative_flatness(model, "4", x, y, lmax=True).kappa_lmax,
        "exact": rf.relative_flatness(model, "2", x, y, batch_size=16).kappa,
        "exact_block": rf.relative_flatness(model, "2", x, y, block_trace=True).block_trace.tolist(),
        "normalized": rf.relative_flatness(model, "0", x, y, normalize_features=True).kappa,
        "stochastic": rf.relative_flatness(model, "2", x, y, method="stochastic", seed=7, max_probes=64).kappa,
        "stochastic_probes": rf.relative_flatness(model, "2", x, y, method="stochastic", seed=7, max_probes=64).probes,
        "robustness": rf.feature_robustness(model, "2", x, y, delta=0.1, n_samples=8, seed=3).value,
    }


def _worker(rank, world, init_file, out_file):
    with gloo_group(rank, world, init_file):
        model, x, y = _setup()
        shard = slice(rank * 45, (rank + 1) * 45)
        res = _measure(model, x[shard], y[shard])
        # An unseeded stochastic run draws rank 0's seed on every rank: identical probes.
        res["unseeded"] = rf.stochastic_estimate(model, "2", x[shard], y[shard], max_probes=16, probes_per_round=16).samples.tolist()
        gathered = [None] * world
        dist.all_gather_object(gathered, res["unseeded"])
        res["unseeded_same_on_ranks"] = gathered[0] == gathered[1]
        if rank == 0:
            with open(out_file, "w") as fh:
                json.dump(res, fh)
        # Ranks that disagree on the layer's shape: a clear error on every rank.
        from models import mlp
        other = mlp([6, 8, 7 + rank, 4], "tanh", seed=0)
        try:
            rf.relative_flatness(other, "2", x[shard], y[shard])
            ok = False
        except ValueError as exc:
            ok = "mismatched shards" in str(exc)
        if rank == 0:
            with open(out_file + ".mismatch", "w") as fh:
                fh.write(str(ok))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_gloo_processes_equal_one_process(tmp_path):
    out = str(tmp_path / "out.json")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    with open(out) as fh:
        got = json.load(fh)
    model, x, y = _setup()
    want = _measure(model, x, y)
    for key in ("closed_form", "closed_form_lmax", "exact", "normalized", "robustness", "stochastic"):
        assert got[key] == pytest.approx(want[key], rel=1e-10), key
    assert got["stochastic_probes"] == want["stochastic_probes"]
    torch.testing.assert_close(torch.tensor(got["exact_block"]), torch.tensor(want["exact_block"]), rtol=1e-10, atol=1e-14)
    assert got["unseeded_same_on_ranks"]
    with open(out + ".mismatch") as fh:
        assert fh.read() == "True"


def test_distributed_true_without_a_process_group_is_a_clear_error():
    model, x, y = _setup()
    with pytest.raises(RuntimeError, match="no torch.distributed process group"):
        rf.relative_flatness(model, "2", x, y, distributed=True)
