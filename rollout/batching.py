"""Request batching in front of one engine: jobs are cut into engine calls of at most `max_sequences` sequences,
served round-robin, and whole unseeded jobs with the same sampling parameters but for max_new_tokens share a call (each
prompt keeps its own cap: RolloutEngine.generate's per-prompt caps). Used by the rollout
service (rollout/server.py) and the eval runner's local engine (scripts/eval/targets.py). No torch.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from rollout.api import Completion, SamplingParams

Generate = Callable[[list[list[int]], SamplingParams, list[int] | None], Awaitable[list[Completion]]]


@dataclass
class _Job:
    prompts: list[list[int]]
    params: SamplingParams
    future: asyncio.Future
    done: list[Completion] = field(default_factory=list)
    next: int = 0  # first prompt not generated yet

    @property
    def size(self) -> int:
        """Sequences still to generate."""
        return (len(self.prompts) - self.next) * self.params.n

    def chunk(self, max_sequences: int) -> tuple[list[list[int]], SamplingParams]:
        """The next engine call's prompts; a seeded request's later chunks get their own seed (seed + offset)."""
        count = max(1, max_sequences // self.params.n)
        params = self.params
        if params.seed is not None and self.next:
            params = dataclasses.replace(params, seed=params.seed + self.next)
        return self.prompts[self.next : self.next + count], params


class Batcher:
    """Feeds generation jobs to the engine thread one engine call at a time: a job larger than `max_sequences` goes
    in chunks, round-robin with the others (after a chunk the job goes to the back of the queue), and queued whole
    jobs with identical unseeded sampling parameters are merged into one call (a seeded job runs alone, so its
    samples do not depend on its neighbours). Jobs whose future is done (caller gone, shutdown) are dropped."""

    def __init__(self, generate: Generate, max_sequences: int):
        self.generate, self.max_sequences = generate, max_sequences
        self.merged_requests = 0  # jobs that shared an engine call with others
        self.queue: list[_Job] = []
        self.current: list[_Job] = []
        self.wake = asyncio.Event()
        self.running = asyncio.Event()  # cleared by /pause
        self.running.set()
        self.idle = asyncio.Event()  # set while no engine call is in flight
        self.idle.set()
        self.in_flight = 0

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> _Job:
        job = _Job(prompts, params, asyncio.get_running_loop().create_future())
        self.queue.append(job)
        self.wake.set()
        return job

    def _take(self) -> list[tuple[_Job, list[list[int]], SamplingParams]]:
        first = self.queue.pop(0)
        prompts, params = first.chunk(self.max_sequences)
        calls, total = [(first, prompts, params)], len(prompts) * params.n
        if params.seed is None and first.next == 0 and len(prompts) == len(first.prompts):
            for job in list(self.queue):
                same = dataclasses.replace(job.params, max_new_tokens=params.max_new_tokens) == params
                if job.next == 0 and same and total + job.size <= self.max_sequences:
                    calls.append((job, job.prompts, job.params))
                    self.queue.remove(job)
                    total += job.size
        return calls

    def fail_all(self, error: Exception) -> None:
        for job in self.queue + self.current:
            if not job.future.done():
                job.future.set_exception(error)
        self.queue.clear()

    async def run_forever(self) -> None:
        while True:
            await self.running.wait()
            self.queue = [j for j in self.queue if not j.future.done()]  # callers that went away
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
                continue
            calls = self._take()
            self.idle.clear()  # no await since _take: /pause cannot slip in between
            self.current = [job for job, _, _ in calls]
            self.in_flight = sum(len(prompts) * params.n for _, prompts, params in calls)
            try:
                await self._run(calls)
            finally:
                self.in_flight, self.current = 0, []
                self.idle.set()

    async def _run(self, calls: list[tuple[_Job, list[list[int]], SamplingParams]]) -> None:
        prompts = [p for _, chunk, _ in calls for p in chunk]
        caps = [job_params.max_new_tokens for _, chunk, job_params in calls for _ in chunk]
        params = dataclasses.replace(calls[0][2], max_new_tokens=max(caps))
        try:
            results = await self.generate(prompts, params, None if len(set(caps)) == 1 else caps)
        except Exception as err:  # every merged caller learns of it; the loop lives on
            for job, _, _ in calls:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        self.merged_requests += len(calls) if len(calls) > 1 else 0
        start = 0
        for job, chunk, _ in calls:
            part = results[start * params.n : (start + len(chunk)) * params.n]
            for c in part:
                c.prompt_index += job.next - start
            job.done += part
            job.next += len(chunk)
            start += len(chunk)
            if job.future.done():
                continue
            if job.next == len(job.prompts):
                job.future.set_result(job.done)
            else:
                self.queue.append(job)  # round-robin: the rest waits behind what queued meanwhile
