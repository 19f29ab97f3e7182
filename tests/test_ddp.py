"""DDP: two gloo processes on the CPU give the gradients of single-process training.

Each rank gets half of the batch; DDP averages the gradients, which for a
batch-mean loss equals the gradient of the whole batch in one process.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from lstm_kernels import FusedLSTM

WORLD = 2
BATCH = 4


def _make_model():
    torch.manual_seed(0)
    return FusedLSTM(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(6, BATCH, 3, dtype=torch.float64, generator=gen)


def _loss(model, x):
    out, (h_n, c_n) = model(x)
    return out.square().mean() + h_n.square().mean() + c_n.square().mean()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(_make_model())
        shard = _data().chunk(WORLD, dim=1)[rank]
        _loss(model, shard).backward()
        results[rank] = {n: p.grad.clone() for n, p in model.module.named_parameters()}
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process():
    single = _make_model()
    _loss(single, _data()).backward()
    expected = {n: p.grad for n, p in single.named_parameters()}

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=WORLD, join=True)
        per_rank = dict(results)
    assert sorted(per_rank) == list(range(WORLD))
    for rank, grads in per_rank.items():
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-12, msg=f"rank {rank} {name}")
