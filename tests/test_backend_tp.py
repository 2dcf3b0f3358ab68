"""Which KV heads a tensor-parallel rank holds (the slice of the calibration it needs)."""

import pytest
import torch
import vllm.distributed

from tq_vllm.backend import local_kv_heads


@pytest.fixture
def rank_of(monkeypatch):
    def set_rank(rank, tp):
        monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_rank", lambda: rank)
        monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_world_size", lambda: tp)
    return set_rank


def test_single_rank_holds_every_head():
    assert local_kv_heads(3, 3).tolist() == [0, 1, 2]


@pytest.mark.parametrize("rank,want", [(0, [0, 1]), (1, [2, 3])])
def test_heads_split_across_ranks(rank_of, rank, want):
    rank_of(rank, 2)
    assert local_kv_heads(4, 2).tolist() == want


@pytest.mark.parametrize("rank,want", [(0, [0]), (1, [0]), (2, [1]), (3, [1])])
def test_fewer_heads_than_ranks_replicate(rank_of, rank, want):
    rank_of(rank, 4)
    assert local_kv_heads(2, 1).tolist() == want


def test_unmappable_split_is_an_error(rank_of):
    rank_of(0, 2)
    with pytest.raises(RuntimeError, match="cannot map"):
        local_kv_heads(3, 2)
