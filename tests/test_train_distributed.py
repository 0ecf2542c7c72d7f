"""Multi-process training: process-group setup, where collectives run, and train metrics that
count every training window once over all ranks.

The NCCL path needs GPUs; its setup is checked here with torch's CUDA and process-group calls
recorded instead of run, and its collectives with a tensor device the spy can see.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _train_fixtures import cached, make_alanine_dipeptide, tiny_config, torchrun_train

import surrogate_md.train.loop as loop
from surrogate_md.metrics import ErrorSums


@pytest.fixture(scope="module")
def ala(tmp_path_factory):
    return cached(tmp_path_factory, "ala", make_alanine_dipeptide)


# -- process group and collectives ----------------------------------------------------------------
def test_nccl_setup_binds_the_rank_gpu_before_the_group(monkeypatch):
    import torch.distributed as tdist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group",
                        lambda **kwargs: calls.append(("init_process_group", kwargs)))
    dist = loop._init_distributed("auto")
    gpu = torch.device("cuda", 1)
    assert calls == [("set_device", gpu),
                     ("init_process_group", {"backend": "nccl", "device_id": gpu})]
    assert (dist.rank, dist.world, dist.local_rank, dist.owns_group) == (1, 2, 1, True)
    assert dist.device == gpu


def test_gloo_setup_on_cpu(monkeypatch):
    import torch.distributed as tdist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # but --device cpu
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group",
                        lambda **kwargs: calls.append(("init_process_group", kwargs)))
    dist = loop._init_distributed("cpu")
    assert calls == [("init_process_group", {"backend": "gloo"})]
    assert dist.device == torch.device("cpu")


class _Reduced(Exception):
    pass


def test_sums_are_reduced_on_the_collective_device(monkeypatch):
    """NCCL groups have no backend for CPU tensors: the sums must go to the rank's device.
    ("meta" stands in for the GPU: the spy sees the device, the sums cannot come back.)"""
    import torch.distributed as tdist

    seen = []

    def spy(tensor, *args, **kwargs):
        seen.append((tensor.device, tensor.dtype, tuple(tensor.shape)))
        raise _Reduced

    monkeypatch.setattr(tdist, "all_reduce", spy)
    dist = loop.Dist(rank=0, world=2, device=torch.device("meta"))
    with pytest.raises(_Reduced):
        loop._all_reduce_sums(ErrorSums(np.array([1.0, 2.0]), 10), dist)
    assert seen == [(torch.device("meta"), torch.float64, (3,))]


def test_sums_come_back_on_the_cpu(monkeypatch):
    import torch.distributed as tdist

    def two_equal_ranks(tensor, *args, **kwargs):
        tensor.mul_(2)

    monkeypatch.setattr(tdist, "all_reduce", two_equal_ranks)
    out = loop._all_reduce_sums(ErrorSums(np.array([1.0, 2.0]), 10), loop.Dist(0, 2))
    np.testing.assert_array_equal(out.per_time, [2.0, 4.0])
    assert out.atoms == 20 and isinstance(out.per_time, np.ndarray)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_real_samples_are_each_window_once_over_the_ranks(world):
    from torch.utils.data.distributed import DistributedSampler

    for n in range(1, 12):
        counted = []
        for rank in range(world):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                         seed=3, drop_last=False)
            sampler.set_epoch(2)
            shard = list(sampler)
            assert len(shard) == -(-n // world)  # padded to equal shards
            counted += shard[:loop._real_samples(n, loop.Dist(rank, world))]
        assert sorted(counted) == list(range(n)), (n, world)


# -- metrics of a DDP run -------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_train_metrics_count_every_window_once(ala, tmp_path):
    """47 training windows over 2 ranks: rank 1's shard ends with a repeat of rank 0's first
    window. At a learning rate too small to move the weights, the recorded train metrics must
    be those of the 47 windows (samples, A-MSE), and train_loss the mean loss of both ranks'
    steps."""
    from surrogate_md.checkpoint import load_checkpoint
    from surrogate_md.data import keys as K
    from surrogate_md.data.windows import batch_to
    from surrogate_md.metrics import batch_amse
    from surrogate_md.models import build_model
    from surrogate_md.train.config import config_from_dict
    from surrogate_md.train.data import prepare_data

    cfg = tiny_config(ala, "egnn", data={"counts": [47, 8, 8]},
                      train={"epochs": 1, "batch_size": 4, "lr": 1e-12})
    run = tmp_path / "ddp"
    res = torchrun_train(cfg, run, "-q")
    assert res.returncode == 0, res.stderr[-3000:]
    epoch = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["samples"] == 47 and epoch["step"] == 6  # 24 windows a rank, 6 steps of 4

    best = load_checkpoint(run / "best.pt")
    model = build_model(best["model"]["name"], best["model"]["config"])
    model.load_state_dict(best["state_dict"])
    prepared = prepare_data(config_from_dict(cfg).data)
    try:
        train_ds = prepared.datasets["train"]
        whole = loop.evaluate_dataset(model, train_ds, batch_size=8, device=torch.device("cpu"))
        # the steps both ranks took, batch by batch, as their samplers dealt them
        from torch.utils.data.distributed import DistributedSampler

        losses = []
        for rank in range(2):
            sampler = DistributedSampler(train_ds, num_replicas=2, rank=rank, shuffle=True,
                                         seed=0, drop_last=False)
            sampler.set_epoch(0)
            shard = list(sampler)
            for s in range(0, len(shard), 4):
                batch = batch_to(train_ds.collate([train_ds[i] for i in shard[s:s + 4]]),
                                 torch.device("cpu"))
                with torch.no_grad():
                    losses.append(float(batch_amse(model(batch), batch[K.TARGET])))
    finally:
        prepared.close()
    assert len(losses) == 12
    assert epoch["train_amse"] == pytest.approx(whole.amse, rel=1e-5)
    assert epoch["train_fmse"] == pytest.approx(whole.fmse, rel=1e-5)
    assert epoch["train_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
