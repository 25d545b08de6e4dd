"""One global order of training records, whatever the number of processes.

The training stream is a sequence of epochs, each an ordering of record indices (a shuffle, or identity-balanced
P x K batches). Global batch s is positions s * B ... s * B + B - 1 of the stream; process p of P reads rows
p * B / P ... (p + 1) * B / P - 1 of every global batch, which is where `jax.make_array_from_process_local_data`
puts them. Each record's random augmentation is drawn from (seed, stream position). So one process with two
devices and two processes with one device each train on the same batches, and a run resumed on another
process count continues the same stream from the checkpoint's step.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import grain
import numpy as np


class RecordStream:
    """Stream position -> record index, epoch e ordered by `epoch_order(e)`; epochs may differ in length."""

    def __init__(self, epoch_order: Callable[[int], np.ndarray], epoch_length: int | None = None):
        self.epoch_order = epoch_order
        self.epoch_length = epoch_length  # known and constant: positions map to epochs by division
        self._starts = [0]  # first position of each epoch measured so far
        self._cached: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()  # grain's reader threads ask for positions concurrently

    def _order(self, epoch: int) -> np.ndarray:
        cached = self._cached
        if cached is not None and cached[0] == epoch:
            return cached[1]
        order = np.asarray(self.epoch_order(epoch))
        if order.size == 0:
            raise ValueError(f"epoch {epoch} of the training stream is empty")
        self._cached = (epoch, order)
        return order

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, offset within it) of a stream position."""
        if self.epoch_length:
            return divmod(position, self.epoch_length)
        with self._lock:
            while position >= self._starts[-1]:
                epoch = len(self._starts) - 1
                self._starts.append(self._starts[-1] + len(self._order(epoch)))
            epoch = int(np.searchsorted(self._starts, position, side="right")) - 1
            return epoch, position - self._starts[epoch]

    def __getitem__(self, position: int) -> int:
        epoch, offset = self.locate(position)
        return int(self._order(epoch)[offset])

    def __getstate__(self) -> dict:
        # Grain pickles the sampler into its worker processes: each starts with a lock and cache of its own.
        return {"epoch_order": self.epoch_order, "epoch_length": self.epoch_length}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["epoch_order"], state["epoch_length"])


def shuffled_epochs(num_records: int, seed: int) -> RecordStream:
    """Every record once per epoch, in a fresh permutation of (seed, epoch)."""
    return RecordStream(lambda epoch: np.random.default_rng([seed, epoch]).permutation(num_records), num_records)


class GlobalBatchSampler:
    """A grain sampler reading this process's rows of every global batch of `stream`, from `start_step` on.

    Give the DataLoader `shard_options()`: grain then asks process p for indices p, p + P, p + 2P, ..., the
    local rows in order.
    """

    def __init__(self, stream: RecordStream, global_batch: int, process_index: int, process_count: int,
                 seed: int, start_step: int = 0):
        if global_batch % process_count:
            raise ValueError(f"the global batch of {global_batch} does not divide over {process_count} processes")
        self.stream = stream
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.process_index = process_index
        self.process_count = process_count
        self.seed = seed
        self.start_step = start_step

    def shard_options(self) -> grain.sharding.ShardOptions:
        return grain.sharding.ShardOptions(shard_index=self.process_index, shard_count=self.process_count)

    def __len__(self) -> int:
        return sys.maxsize // 2  # endless; grain divides this by the process count

    def position(self, index: int) -> int:
        """The stream position of grain's interleaved sampler index."""
        process, local = index % self.process_count, index // self.process_count
        step, row = divmod(local, self.local_batch)
        return (self.start_step + step) * self.global_batch + process * self.local_batch + row

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        position = self.position(index)
        rng = np.random.Generator(np.random.Philox(key=(self.seed << 64) + position))
        return grain.RecordMetadata(index=index, record_key=self.stream[position], rng=rng)

    def __repr__(self) -> str:  # grain stores it in the iterator state
        return (f"GlobalBatchSampler(global_batch={self.global_batch}, process={self.process_index}/"
                f"{self.process_count}, seed={self.seed}, start_step={self.start_step})")
