"""Readout orders the sensor stage built, handed to the model stage of the same live run.

With rotation every frame has a readout order of its own and both stages need it: the sensor stage
reads the frame out in it, and the keyed classifier builds the frame's slot tables from it. Building an
order (three keyed row-permutation passes, :func:`sensor.readout_tables.stacked_tables`) was the larger
part of the model stage's per-frame work at 1920x1080 (measured 2026-12-04, 2 cores, batches of 8: 10.6
of about 30 ms a frame with pixel readout, 5.3 of about 16 with quad). A :class:`ReadoutHandoff` keeps
the orders the sensor stage built, by frame index, until the classifier takes them; an order that is
not there (never put, or evicted) is built again, so the predictions are the same either way.

* Bounded: at most ``capacity`` orders, the oldest evicted first, so memory stays flat whatever the
  stages' speeds (one 1920x1080 pixel order is three uint16 tables, 12 MB); :func:`handoff_capacity`
  covers the frames a live run holds between the two stages, up to :data:`MAX_BYTES` of orders.
* Checked by the taker: the classifier uses an order only when its readout subkey equals the one it
  derives for that frame itself (:meth:`pipeline.stream.classifier.KeyedClassifier.prepare_array`), so
  a handoff filled under another key or session cannot change a prediction.
* In the process only: the orders are key material; a handoff refuses to be pickled, as
  :class:`sensor.readout.ReadoutPermutation` does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from sensor.readout import ReadoutPermutation, Scheme
from sensor.readout_tables import grid_shape, plane_count, table_dtype

MAX_BYTES = 1 << 30  # the most memory a handoff's orders may take (more are evicted, then built again)


def order_nbytes(scheme: Scheme, height: int, width: int) -> int:
    """Bytes of one frame's readout order: three pass tables per permuted grid (12 MB at 1920x1080 pixel)."""
    rows, cols = grid_shape(scheme, height, width)
    return 3 * plane_count(scheme) * rows * cols * table_dtype(rows, cols).itemsize


def handoff_capacity(batch_size: int, micro_batch: int, queue_size: int, order_bytes: int = 0,
                     max_bytes: int = MAX_BYTES) -> int:
    """Orders a live run may hold between capture and classification: two stage queues of micro-batches
    (sensor -> recorder -> batcher), the batch being filled, the one waiting and the one prepared; but
    no more than ``max_bytes`` of orders of ``order_bytes`` each (at least one batch's)."""
    frames = 2 * queue_size * micro_batch + 3 * batch_size
    return max(batch_size, min(frames, max_bytes // order_bytes)) if order_bytes > 0 else frames


class ReadoutHandoff:
    """Thread-safe, bounded map frame index -> the :class:`ReadoutPermutation` the sensor read it out in.

    Args:
        capacity: the most orders kept (>= 1); putting one more evicts the oldest.
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"ReadoutHandoff: capacity: expected an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self._orders: OrderedDict[int, ReadoutPermutation] = OrderedDict()
        self._lock = threading.Lock()
        self.taken = self.missed = self.evicted = 0

    def put(self, frame_index: int, order: ReadoutPermutation) -> None:
        """Keep ``order`` (frame ``frame_index``'s readout) for :meth:`take`."""
        with self._lock:
            self._orders[int(frame_index)] = order
            self._orders.move_to_end(int(frame_index))
            while len(self._orders) > self.capacity:
                self._orders.popitem(last=False)
                self.evicted += 1

    def take(self, frame_index: int) -> ReadoutPermutation | None:
        """Frame ``frame_index``'s order, removed from the handoff; None when it is not there."""
        with self._lock:
            order = self._orders.pop(int(frame_index), None)
            if order is None:
                self.missed += 1
            else:
                self.taken += 1
            return order

    def clear(self) -> None:
        with self._lock:
            self._orders.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._orders)

    def to_dict(self) -> dict[str, Any]:
        """What a run summary reports: the capacity and how many orders were taken, built again, evicted."""
        with self._lock:
            return {"capacity": self.capacity, "taken": self.taken, "built_again": self.missed,
                    "evicted": self.evicted}

    def __reduce__(self):
        raise TypeError("ReadoutHandoff holds per-frame readout orders (key material) and cannot be pickled")
