"""Each consumed partition's lag, kept current, and a warning when a partition stalls.

A stage (and the API's feed) sets `dosewatch_consumer_lag`, by topic and partition, after
every fetch, with records or without. Set only when records came, the gauge of a consumer
that is handed nothing kept its last value (about 0) however far behind it fell: what the
embedded broker does once a partition holds more history than it can list within the fetch
wait (docs/performance.md, "Tenth round"). A partition that stays behind with nothing handed
out for `stall_s` is logged once, and again once records flow.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Literal

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.common.fetched import FetchedRecord
from services.common.metrics import CONSUMER_LAG

log = logging.getLogger(__name__)

Change = Literal["stalled", "resumed"]


class StallWatch:
    """Since when each partition has been behind with no records handed out, and whether that
    has lasted `stall_s`. No I/O: the caller reports each fetch."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self._behind_since: dict[TopicPartition, float] = {}
        self._stalled: set[TopicPartition] = set()

    def update(self, tp: TopicPartition, lag: int, handed_out: bool, now: float) -> Change | None:
        """One fetch's view of a partition; returns the change it makes, if any."""
        if handed_out or lag <= 0:
            self._behind_since.pop(tp, None)
            if tp in self._stalled:
                self._stalled.discard(tp)
                return "resumed"
            return None
        since = self._behind_since.setdefault(tp, now)
        if tp not in self._stalled and now - since >= self.stall_s:
            self._stalled.add(tp)
            return "stalled"
        return None

    def forget(self, tp: TopicPartition) -> None:
        """A partition no longer read here: if it comes back, it is timed afresh."""
        self._behind_since.pop(tp, None)
        self._stalled.discard(tp)


class LagWatch:
    """The lag gauge and stall log of one stage's consumer (`fetched` after every getmany)."""

    def __init__(self, service: str, stall_s: float) -> None:
        self.service = service
        self.stalls = StallWatch(stall_s)
        self._next: dict[TopicPartition, int] = {}  # offset after the last one handed out

    def fetched(
        self,
        consumer: AIOKafkaConsumer,
        batches: Mapping[TopicPartition, Sequence[FetchedRecord]],
        now: float,
    ) -> None:
        for tp, records in batches.items():
            if records:
                self._next[tp] = records[-1].offset + 1
        assigned = consumer.assignment()
        for tp in [tp for tp in self._next if tp not in assigned]:
            # Revoked: another member reads it now. Where this one stopped says nothing of
            # where reading resumes if it comes back, and its lag is the new owner's to show.
            del self._next[tp]
            self.stalls.forget(tp)
            with contextlib.suppress(KeyError):
                CONSUMER_LAG.remove(self.service, tp.topic, str(tp.partition))
        for tp in assigned:
            end, after = consumer.highwater(tp), self._next.get(tp)
            if end is None or after is None:
                continue  # nothing known yet: no fetch answered, or nothing handed out
            lag = end - after
            CONSUMER_LAG.labels(self.service, tp.topic, str(tp.partition)).set(lag)
            change = self.stalls.update(tp, lag, bool(batches.get(tp)), now)
            if change == "stalled":
                log.warning(
                    "consumer stalled: records to read, and the broker hands out none",
                    extra={"topic": tp.topic, "partition": tp.partition, "lag": lag,
                           "for_s": self.stalls.stall_s},
                )  # fmt: skip
            elif change == "resumed":
                log.info("consumer resumed", extra={"topic": tp.topic, "partition": tp.partition})
