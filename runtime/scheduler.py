"""Continuous batching: which requests prefill and which decode at each engine step.

Pure Python (no torch), so it runs and is tested anywhere. Requests wait in a FIFO queue and are admitted
while a sequence slot is free and the caller's ``cache_budget`` says their cache fits. Admission stops at the
first request that does not fit: letting smaller ones overtake would starve big prompts forever. Running
requests decode in groups of one rung each, because a batched forward pass runs at a single pruning rate.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .request import Request, Status


def retry_after_s(waiting: int, max_num_seqs: int) -> float:
    """Rough wait for a 429: about one second per full batch ahead in the queue, at least one."""
    return max(1.0, 1.0 * math.ceil(waiting / max_num_seqs))


class EngineStopped(RuntimeError):
    """``AsyncEngine.submit`` after the engine thread stopped: no step would ever run the request (here, with
    QueueFull, so the HTTP layer can name it without importing the engine and torch)."""


class QueueFull(Exception):
    """The waiting queue is full; the server answers 429 with ``Retry-After: retry_after_s``."""

    def __init__(self, retry_after_s: float):
        super().__init__(f"the request queue is full, retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


@dataclass
class Step:
    """One engine step: newly admitted requests to prefill, and running ones to decode, grouped by rung."""

    prefill: list[Request] = field(default_factory=list)
    decode: dict[int, list[Request]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


def _always_fits(req: Request) -> bool:
    return True


class Scheduler:
    def __init__(self, max_num_seqs: int = 8, max_queued: int = 64, max_model_len: int = 4096,
                 cache_budget: Callable[[Request], bool] | None = None):
        if max_num_seqs < 1 or max_queued < 0 or max_model_len < 1:
            raise ValueError(f"bad scheduler limits: max_num_seqs={max_num_seqs}, max_queued={max_queued}, "
                             f"max_model_len={max_model_len}")
        self.max_num_seqs = max_num_seqs
        self.max_queued = max_queued
        self.max_model_len = max_model_len
        self.cache_budget = cache_budget or _always_fits
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admission order, so decode groups keep a stable order
        self._live: dict[str, Request] = {}  # waiting + running by id, for O(1) cancel lookups

    # ------------------------------------------------------------------------------------------- views
    @property
    def waiting(self) -> tuple[Request, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[Request, ...]:
        return tuple(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def capacity(self) -> int:
        """Sequences the scheduler can ever hold at once: every seat plus every queue place."""
        return self.max_num_seqs + self.max_queued

    @property
    def room(self) -> int:
        """How many requests ``add`` takes now: the free sequence slots (requests admitted at the next step), plus
        ``max_queued`` waiting beyond them."""
        free = max(0, self.max_num_seqs - len(self._running))
        return max(0, self.max_queued + free - len(self._waiting))

    def retry_after_s(self) -> float:
        return retry_after_s(len(self._waiting), self.max_num_seqs)

    # ---------------------------------------------------------------------------------------- requests
    def add(self, req: Request) -> None:
        """Queue a request (ValueError if it can never fit or is already known, QueueFull if the queue is full)."""
        self.check_length(req)
        if req.request_id in self._live or req.status is not Status.WAITING:
            raise ValueError(f"request {req.request_id} was already added")
        if self.room == 0:
            raise QueueFull(self.retry_after_s())
        self._waiting.append(req)
        self._live[req.request_id] = req

    def check_length(self, req: Request) -> None:
        """ValueError if prompt + max_tokens can never fit (reads only the limit: safe from any thread)."""
        if req.max_len > self.max_model_len:
            raise ValueError(f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.params.max_tokens}) = "
                             f"{req.max_len} tokens exceeds max_model_len {self.max_model_len}")

    def finish(self, req: Request, reason: str) -> None:
        """Mark a request finished and free its slot; calling it again (or after cancel) changes nothing."""
        if req.finished:
            return
        self._remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason

    def cancel(self, request_id: str) -> Request | None:
        """Drop a waiting or running request now; returns it so the caller frees its cache, else None."""
        req = self._live.get(request_id)
        if req is None:
            return None
        self.finish(req, "cancelled")
        return req

    def _remove(self, req: Request) -> None:
        if self._live.pop(req.request_id, None) is None:
            return  # never added here: nothing to remove
        if req.status is Status.RUNNING:
            self._running.remove(req)
        else:
            self._waiting.remove(req)

    # -------------------------------------------------------------------------------------------- steps
    def schedule(self) -> Step:
        """Plan one step: decode every request that was already running, prefill the newly admitted ones."""
        decode = self._group_by_rung(self._running)  # before admission: new requests prefill this step
        return Step(prefill=self._admit(), decode=decode)

    def _admit(self) -> list[Request]:
        admitted = []
        while self._waiting and len(self._running) < self.max_num_seqs:
            head = self._waiting[0]
            if not self.cache_budget(head):
                break  # no overtaking: the head waits for memory and everyone behind it waits too
            self._waiting.popleft()
            head.status = Status.RUNNING
            self._running.append(head)
            admitted.append(head)
        return admitted

    @staticmethod
    def _group_by_rung(reqs: list[Request]) -> dict[int, list[Request]]:
        groups: dict[int, list[Request]] = {}
        for req in reqs:
            groups.setdefault(req.rung, []).append(req)
        return dict(sorted(groups.items()))  # rung order, so a step's launches are deterministic
