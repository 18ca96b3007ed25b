"""Fast CPU contract tests for the parallel layer: mesh validation, config, data sharding, clipping."""

from __future__ import annotations

import pytest
import torch

from colodiffusion.config import ConfigError, load_config
from colodiffusion.data.loader import ResumableLoader
from colodiffusion.parallel import build_backend
from colodiffusion.parallel.dims import ParallelDims
from colodiffusion.parallel.distributed import clip_grad_norm
from common import index_dataset


def test_mesh_must_multiply_to_world_size_and_says_so():
    with pytest.raises(ConfigError) as e:
        ParallelDims(dp_replicate=1, dp_shard=3, tp=2, world_size=4)
    msg = str(e.value)
    assert "dp_replicate (1)" in msg and "dp_shard (3)" in msg and "tp (2)" in msg and "world size is 4" in msg


def test_fsdp_shards_over_what_replicate_and_tp_leave():
    cfg = load_config(None, ["parallel.strategy=fsdp", "parallel.dp_replicate=2", "parallel.tp=2"])
    dims = ParallelDims.from_config(cfg, world_size=8)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp_size) == (2, 2, 2, 4)
    with pytest.raises(ConfigError, match=r"tp \(3\).*world size \(8\)"):
        ParallelDims.from_config(load_config(None, ["parallel.strategy=fsdp", "parallel.tp=3"]), world_size=8)


def test_ddp_replicates_everywhere_and_refuses_tp():
    dims = ParallelDims.from_config(load_config(None, ["parallel.strategy=ddp"]), world_size=4)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp) == (4, 1, 1)
    with pytest.raises(ConfigError, match="strategy=fsdp"):
        ParallelDims.from_config(load_config(None, ["parallel.strategy=ddp", "parallel.tp=2"]), world_size=4)


def test_tp_ranks_share_a_data_parallel_rank():
    dims = ParallelDims(dp_replicate=2, dp_shard=2, tp=2, world_size=8)
    assert [dims.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    dims = ParallelDims(dp_replicate=1, dp_shard=4, tp=1, world_size=4)
    assert [dims.dp_rank(r) for r in range(4)] == [0, 1, 2, 3]


@pytest.mark.parametrize("override, key", [("parallel.zero=4", "parallel.zero"),
                                            ("parallel.strategy=zero", "parallel.strategy"),
                                            ("parallel.offload=disk", "parallel.offload"),
                                            ("parallel.tp=0", "parallel.tp"),
                                            ("parallel.timeout_s=0", "parallel.timeout_s")])
def test_bad_parallel_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_single_strategy_refuses_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="strategy=ddp or fsdp"):
        build_backend(load_config(None, []))




@pytest.mark.parametrize("world, num_workers", [(2, 0), (4, 0), (2, 2)])
def test_ranks_read_disjoint_slices_that_cover_the_epoch(world, num_workers):
    n, batch = 64, 4
    seen = []
    for rank in range(world):
        loader = ResumableLoader(index_dataset(n), batch, seed=3, rank=rank, world_size=world, num_workers=num_workers)
        mine = [int(v) for _ in range(n // world // batch) for v in next(loader)["pixel_values"].flatten()]
        assert loader.epoch == 0
        seen.append(set(mine))
        assert len(mine) == len(set(mine)) == n // world
    assert all(a.isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1:])
    assert set().union(*seen) == set(range(n))


def test_clip_grad_norm_matches_torch_on_plain_tensors():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for x, y in zip(a, b):
        x.grad = torch.randn_like(x) * 3
        y.grad = x.grad.clone()
    ours = clip_grad_norm(a, 1.0)
    ref = torch.nn.utils.clip_grad_norm_(b, 1.0)
    torch.testing.assert_close(ours, ref)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)
