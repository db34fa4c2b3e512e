"""A tensor-parallel replica its model's heads or the host's GPUs cannot hold is refused before
any rank starts: each rank would otherwise start, load, and fail on its own (8,000 ranks asked of
`alise up --tensor-parallel-size` started 8,000 processes)."""

from __future__ import annotations

import multiprocessing

import pytest

from alise.worker.config import WorkerConfig
from alise.worker.model.tp_serving import check_split, load_tp_served_model


@pytest.mark.parametrize(("size", "says"), [(3, "must divide the 4 attention heads"),
                                            (8000, "must divide the 4 attention heads")])
def test_a_split_the_heads_cannot_take_is_refused_before_any_rank_starts(size, says):
    config = WorkerConfig(model="tiny-llama", device="cpu", tensor_parallel_size=size)
    with pytest.raises(ValueError, match=says):
        load_tp_served_model(config)
    assert multiprocessing.active_children() == []


def test_a_split_that_fits_passes_and_more_gpus_than_the_host_has_is_refused():
    check_split(WorkerConfig(model="tiny-llama", device="cpu", tensor_parallel_size=2))
    check_split(WorkerConfig(model="tiny-llama", device="cpu", tensor_parallel_size=4))  # KV heads replicated
    with pytest.raises(ValueError, match="needs 3 GPUs; this host has"):
        check_split(WorkerConfig(model="tiny-llama", device="cuda:1", tensor_parallel_size=2))
