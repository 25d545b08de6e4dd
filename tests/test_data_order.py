"""One global record order on any number of processes (jaxretrieval.data.order)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grain
import numpy as np
import pytest

from jaxretrieval.data.order import GlobalBatchSampler, RecordStream, shuffled_epochs


def process_rows(sampler_args: dict, processes: int, steps: int) -> list[np.ndarray]:
    """Each global batch as the processes' rows concatenated in process order (record key and first rng draw)."""
    batch = sampler_args["global_batch"] // processes
    per_process = []
    for p in range(processes):
        sampler = GlobalBatchSampler(**sampler_args, process_index=p, process_count=processes)
        # grain asks process p for indices p, p + P, p + 2P, ...
        metas = [sampler[p + processes * i] for i in range(steps * batch)]
        per_process.append([(m.record_key, m.rng.random()) for m in metas])
    return [np.asarray([row for p in range(processes) for row in per_process[p][s * batch:(s + 1) * batch]])
            for s in range(steps)]


@pytest.mark.parametrize("processes", [2, 4, 8])
def test_processes_read_their_rows_of_the_same_global_batches(processes):
    args = {"stream": shuffled_epochs(50, seed=3), "global_batch": 16, "seed": 3}
    one = process_rows(args, 1, steps=7)
    assert [len(b) for b in one] == [16] * 7
    for a, b in zip(one, process_rows(args, processes, steps=7), strict=True):
        np.testing.assert_array_equal(a, b)  # same records, same augmentation draws


def test_start_step_continues_the_stream():
    args = {"stream": shuffled_epochs(50, seed=0), "global_batch": 8, "seed": 0}
    whole = process_rows(args, 2, steps=6)
    resumed = process_rows({**args, "start_step": 4}, 4, steps=2)
    for a, b in zip(whole[4:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_shuffled_epochs_visit_every_record_once_per_epoch():
    stream = shuffled_epochs(13, seed=1)
    epochs = [[stream[e * 13 + i] for i in range(13)] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(13))
    assert epochs[0] != epochs[1]
    assert [stream[i] for i in range(13)] == [shuffled_epochs(13, seed=1)[i] for i in range(13)]
    assert epochs[0] != [shuffled_epochs(13, seed=2)[i] for i in range(13)]


def test_epochs_of_different_lengths():
    stream = RecordStream(lambda epoch: np.arange(epoch + 1) + 100 * epoch)  # lengths 1, 2, 3, ...
    assert [stream[i] for i in range(6)] == [0, 100, 101, 200, 201, 202]
    assert stream.locate(5) == (2, 2)
    assert stream[9] == 303  # epoch 3 starts at position 6
    assert stream[1] == 100  # earlier positions stay reachable
    with pytest.raises(ValueError, match="epoch 0 .* is empty"):
        RecordStream(lambda epoch: np.arange(0))[0]


@pytest.mark.parametrize("stream", [lambda: shuffled_epochs(7, seed=0),
                                    lambda: RecordStream(lambda epoch: np.arange(epoch % 3 + 2) + 10 * epoch)])
def test_concurrent_readers_see_the_sequential_stream(stream):
    """grain reads records from several threads at once; across epoch boundaries each must get its own epoch."""
    positions = list(range(400)) * 4
    expected = [stream()[p] for p in range(400)]
    shared = stream()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: shared[p], positions))
    assert got == expected * 4


def test_sampler_plumbing():
    sampler = GlobalBatchSampler(shuffled_epochs(10, 0), 8, process_index=1, process_count=2, seed=0, start_step=3)
    options = sampler.shard_options()
    assert (options.shard_index, options.shard_count) == (1, 2)
    assert sampler.local_batch == 4
    assert sampler.position(1) == 3 * 8 + 4  # process 1's first row of global batch 3
    assert isinstance(sampler[1], grain.RecordMetadata)
    with pytest.raises(ValueError, match="global batch of 10 does not divide over 4 processes"):
        GlobalBatchSampler(shuffled_epochs(10, 0), 10, 0, 4, seed=0)
