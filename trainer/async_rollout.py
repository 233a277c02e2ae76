"""Where the trainer's batches come from: generated on demand (synchronous) or by producer threads running ahead.

The loop asks `source.next_batch(version)` once per step, passing the weight version it is about to train (the
engine's version after the last sync), and gets that step's trajectories (None = dropped by the workflow, as from
`Workflow.run`). `make_source` picks the path from `rollout.max_staleness` (η):

- η = 0: `SyncSource` samples the step's prompts and runs the workflow right then; no thread, every trajectory comes
  from the current weights.
- η > 0: `AsyncSource` keeps generating in its own threads while the learner trains. New prompts are admitted only while
  AReaL's capacity rule allows it, counted in prompts (groups):
      capacity = min(max_concurrent − running, (η + v + 1)·B − (accepted + running))
  with v = versions trained since the source started, B = prompts per step on this rank (what one sampler call
  returns: a rank's slice of the global batch), accepted = groups delivered to the queue (consumed ones included),
  running = groups being generated (max_concurrent: workers x B unless given). Groups are consumed in the order they were finished,
  and a group whose oldest trajectory is more than η versions behind the version being trained is dropped at
  consumption (and un-counted, so capacity is not lost), so every trained sample satisfies
  `version − sample.weight_version ≤ η` even when an engine lags. The loss then corrects for the off-policy gap with
  the behaviour logprobs each trajectory carries (decoupled PPO).

`workers` producer threads (default 2) each run whole workflow calls; the engine serialises their generations. With
two, one thread starts the next batch's generation the moment the version bump admits it, while the other still
decodes and scores the batch it just generated (on W's H200 step ~10 ms of host work, during which a single
producer left the GPU idle; the step gained ~1%, bench/RESULTS.md). Each call runs on a shallow copy of the workflow taken right after its prompts were
sampled (the sampler reseeds the workflow per call), so concurrent calls keep their own seeds. While a source runs,
Python's GIL switch interval is 0.5 ms instead of 5: a thread woken by the GPU or by a lock otherwise waits up to
5 ms for a turn while another thread scores in Python, and the GPU can run dry meanwhile.

An exception in a producer is re-raised in the trainer by the next `next_batch`; `close()` stops the producers
after their current workflow calls.
"""

from __future__ import annotations

import collections
import copy
import sys
import threading
from collections.abc import Callable
from typing import Any

from rollout.api import RolloutEngine
from trainer.api import Trajectory, Workflow

SWITCH_INTERVAL_S = 0.0005
"""Python's GIL switch interval while an AsyncSource runs (module docstring)."""

Sampler = Callable[[], tuple[list[dict[str, Any]], list[int]]]  # one step's (items, group_ids); StopIteration = done


def capacity(max_concurrent: int, running: int, accepted: int, version: int, max_staleness: int, batch: int) -> int:
    """AReaL's staleness capacity: how many more prompts may start now (may be <= 0)."""
    return min(max_concurrent - running, (max_staleness + version + 1) * batch - (accepted + running))


class SyncSource:
    """η = 0: generate each step's batch when it is asked for."""

    def __init__(self, engine: RolloutEngine, workflow: Workflow, sample: Sampler) -> None:
        self.engine, self.workflow, self.sample = engine, workflow, sample
        self.stats: dict[str, float] = {}

    def next_batch(self, version: int) -> list[Trajectory | None]:
        items, group_ids = self.sample()
        return self.workflow.run(self.engine, items, group_ids)

    def close(self) -> None:
        pass


class AsyncSource:
    """η > 0: a producer thread runs ahead of the learner, bounded by the capacity rule (module docstring)."""

    def __init__(
        self,
        engine: RolloutEngine,
        workflow: Workflow,
        sample: Sampler,
        max_staleness: int,
        max_concurrent: int | None = None,
        workers: int = 2,
    ) -> None:
        if max_staleness < 1:
            raise ValueError("AsyncSource needs max_staleness >= 1 (0 is SyncSource)")
        if workers < 1:
            raise ValueError(f"AsyncSource needs at least one worker, got {workers}")
        self.engine, self.workflow, self.sample = engine, workflow, sample
        self.eta, self.max_concurrent, self.workers = max_staleness, max_concurrent, workers
        self.batch = 0  # B: prompts per step, learned from the first sampler call
        self._cond = threading.Condition()
        # sampled, not started: (item, group id, the workflow as the sampler left it for them)
        self._pending: collections.deque[tuple[dict, int, Workflow]] = collections.deque()
        self._ready: collections.deque[list[Trajectory | None]] = collections.deque()  # finished groups
        self._running = self._accepted = 0
        self._base: int | None = None  # version at the first next_batch; v counts from here
        self._version = 0
        self._error: BaseException | None = None
        self._exhausted = self._stop = False
        self._threads: list[threading.Thread] = []
        self._switch = sys.getswitchinterval()
        self.stats = {"stale_dropped": 0, "rejected_groups": 0, "staleness_max": 0}

    @property
    def queued(self) -> int:
        """Finished groups waiting to be trained (how far the producer is ahead)."""
        with self._cond:
            return len(self._ready)

    # ---- consumer side (trainer thread) ----
    def next_batch(self, version: int) -> list[Trajectory | None]:
        with self._cond:
            if self._base is None:
                self._start(version)
            self._version = version
            self._cond.notify_all()  # a newer version frees capacity
            groups = []
            while len(groups) < self.batch:
                groups += self._take_fresh(self.batch - len(groups))
                if len(groups) < self.batch:
                    self._raise_if_done()
                    self._cond.wait()
        return [t for g in groups for t in g]

    def _start(self, version: int) -> None:
        self.batch = self._sample()
        self.max_concurrent = self.max_concurrent or self.workers * self.batch
        self._base = version
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        for i in range(self.workers):
            thread = threading.Thread(target=self._produce, name=f"rollout-producer-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _sample(self) -> int:
        """One sampler call into the pending queue, with a copy of the workflow it reseeded; returns its size."""
        items, group_ids = self.sample()
        workflow = copy.copy(self.workflow)
        self._pending.extend((item, gid, workflow) for item, gid in zip(items, group_ids, strict=True))
        return len(items)

    def _take_fresh(self, k: int) -> list[list[Trajectory | None]]:
        out = []
        while self._ready and len(out) < k:
            group = self._ready.popleft()
            lag = self._version - min(t.weight_version for t in group if t is not None)
            if lag > self.eta:
                self._accepted -= 1  # never trained: give its slot back
                self.stats["stale_dropped"] += 1
                self._cond.notify_all()
                continue
            self.stats["staleness_max"] = max(self.stats["staleness_max"], lag)
            out.append(group)
        return out

    def _raise_if_done(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"rollout producer failed: {self._error!r}") from self._error
        if self._exhausted and self._running == 0 and not self._ready:
            raise StopIteration("the rollout data is exhausted")

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        if self._threads:
            sys.setswitchinterval(self._switch)
        self._threads = []

    # ---- producer side (its own thread) ----
    def _produce(self) -> None:
        try:
            while True:
                work = self._admit()
                if work is None:
                    return
                items, group_ids, workflows = zip(*work, strict=True)
                trajectories = workflows[0].run(self.engine, list(items), list(group_ids))
                self._deliver(list(group_ids), trajectories)
        except BaseException as err:  # surfaced to the trainer by next_batch
            with self._cond:
                self._error = err
                self._cond.notify_all()

    def _admit(self) -> list[tuple[dict, int]] | None:
        with self._cond:
            while True:
                if self._stop:
                    return None
                v = self._version - self._base
                room = capacity(self.max_concurrent, self._running, self._accepted, v, self.eta, self.batch)
                if room > 0 and self._fill(room):
                    work = [self._pending.popleft()]
                    # one workflow call per sampler call's copy: never mix two seeds in one call
                    while len(work) < room and self._pending and self._pending[0][2] is work[0][2]:
                        work.append(self._pending.popleft())
                    self._running += len(work)
                    return work
                if self._exhausted and not self._pending:
                    self._cond.notify_all()
                    return None
                self._cond.wait()

    def _fill(self, want: int) -> bool:
        """Top up the pending prompts from the sampler; False when nothing is left."""
        while len(self._pending) < want and not self._exhausted:
            try:
                self._sample()
            except StopIteration:
                self._exhausted = True
                break
        return bool(self._pending)

    def _deliver(self, group_ids: list[int], trajectories: list[Trajectory | None]) -> None:
        per_group = len(trajectories) // len(group_ids)
        with self._cond:
            self._running -= len(group_ids)
            for i in range(len(group_ids)):
                group = trajectories[i * per_group : (i + 1) * per_group]
                if any(t is not None for t in group):
                    self._ready.append(group)
                    self._accepted += 1
                else:
                    self.stats["rejected_groups"] += 1
            self._cond.notify_all()


def make_source(
    engine: RolloutEngine, workflow: Workflow, sample: Sampler, max_staleness: int, workers: int = 2
) -> SyncSource | AsyncSource:
    """The loop's hook: η = rollout.max_staleness picks synchronous (0) or async (> 0) rollout, the latter with
    rollout.async_workers producer threads."""
    if max_staleness == 0:
        return SyncSource(engine, workflow, sample)
    return AsyncSource(engine, workflow, sample, max_staleness, workers=workers)
