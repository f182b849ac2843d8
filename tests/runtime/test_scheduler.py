"""Scheduler: FIFO admission, cache budget without overtaking, rung groups, finish/cancel and invariants."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from uniql.runtime.request import Request, SamplingParams, Status
from uniql.runtime.scheduler import QueueFull, Scheduler, Step


def make(n_prompt: int = 4, max_tokens: int = 8, rung: int = 0) -> Request:
    return Request(list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens), rung=rung)


def ids(reqs) -> list[str]:
    return [r.request_id for r in reqs]


def decoded(step: Step) -> list[Request]:
    return [r for group in step.decode.values() for r in group]


def test_fifo_admission_up_to_max_num_seqs():
    sched = Scheduler(max_num_seqs=3)
    reqs = [make() for _ in range(5)]
    for r in reqs:
        sched.add(r)
    step = sched.schedule()
    assert ids(step.prefill) == ids(reqs[:3])
    assert all(r.status is Status.RUNNING for r in reqs[:3])
    assert ids(sched.waiting) == ids(reqs[3:]) and all(r.status is Status.WAITING for r in reqs[3:])
    assert sched.num_running == 3 and sched.num_waiting == 2


def test_cache_budget_blocks_admission_without_overtaking():
    big, small = make(n_prompt=100), make(n_prompt=2)
    fits = {"big": False}
    sched = Scheduler(max_num_seqs=8, cache_budget=lambda r: len(r.prompt_ids) < 50 or fits["big"])
    first = make(n_prompt=2)
    for r in (first, big, small):
        sched.add(r)
    assert ids(sched.schedule().prefill) == [first.request_id]  # small must not jump ahead of big
    assert ids(sched.waiting) == [big.request_id, small.request_id]
    assert sched.schedule().prefill == []
    fits["big"] = True
    assert ids(sched.schedule().prefill) == [big.request_id, small.request_id]


def test_cache_budget_is_asked_about_the_queue_head_only():
    asked = []
    sched = Scheduler(cache_budget=lambda r: asked.append(r.request_id) or False)
    reqs = [make() for _ in range(3)]
    for r in reqs:
        sched.add(r)
    sched.schedule()
    assert asked == [reqs[0].request_id]


def test_decode_groups_by_rung_in_admission_order():
    sched = Scheduler(max_num_seqs=8)
    reqs = [make(rung=rung) for rung in (2, 0, 2, 1, 0)]
    for r in reqs:
        sched.add(r)
    sched.schedule()
    step = sched.schedule()
    assert list(step.decode) == [0, 1, 2]
    assert ids(step.decode[0]) == ids([reqs[1], reqs[4]])
    assert ids(step.decode[1]) == ids([reqs[3]])
    assert ids(step.decode[2]) == ids([reqs[0], reqs[2]])


def test_newly_admitted_prefill_first_then_decode():
    sched = Scheduler(max_num_seqs=4)
    old = make()
    sched.add(old)
    sched.schedule()
    new = make()
    sched.add(new)
    step = sched.schedule()
    assert ids(step.prefill) == [new.request_id]
    assert ids(decoded(step)) == [old.request_id]
    assert ids(decoded(sched.schedule())) == [old.request_id, new.request_id]


def test_idle_scheduler_returns_an_empty_step():
    sched = Scheduler()
    step = sched.schedule()
    assert step.empty and step.prefill == [] and step.decode == {}
    assert not sched.has_work


def test_finish_frees_a_slot_for_the_next_waiting_request():
    sched = Scheduler(max_num_seqs=2)
    a, b, c = make(), make(), make()
    for r in (a, b, c):
        sched.add(r)
    sched.schedule()
    assert sched.schedule().prefill == []  # full: c keeps waiting
    sched.finish(a, "stop")
    assert a.status is Status.FINISHED and a.finish_reason == "stop"
    step = sched.schedule()
    assert ids(step.prefill) == [c.request_id]
    assert ids(decoded(step)) == [b.request_id]
    sched.finish(a, "length")  # idempotent: no error, reason kept
    assert a.finish_reason == "stop" and sched.num_running == 2


def test_cancel_waiting_request():
    sched = Scheduler(max_num_seqs=1)
    a, b = make(), make()
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert sched.cancel(b.request_id) is b
    assert b.status is Status.FINISHED and b.finish_reason == "cancelled"
    assert sched.num_waiting == 0
    sched.finish(a, "stop")
    assert sched.schedule().empty and not sched.has_work


def test_cancel_running_request_frees_its_slot():
    sched = Scheduler(max_num_seqs=2)
    a, b, c = make(), make(), make()
    for r in (a, b, c):
        sched.add(r)
    sched.schedule()
    assert sched.cancel(a.request_id) is a
    assert a.status is Status.FINISHED and a.finish_reason == "cancelled"
    assert a not in sched.running
    step = sched.schedule()
    assert ids(step.prefill) == [c.request_id]
    assert a not in decoded(step) and a not in decoded(sched.schedule())


def test_cancel_unknown_or_twice_returns_none():
    sched = Scheduler()
    assert sched.cancel("no-such-request") is None
    r = make()
    sched.add(r)
    assert sched.cancel(r.request_id) is r
    assert sched.cancel(r.request_id) is None


def test_cancel_after_finish_returns_none_and_keeps_reason():
    sched = Scheduler()
    r = make()
    sched.add(r)
    sched.schedule()
    sched.finish(r, "length")
    assert sched.cancel(r.request_id) is None and r.finish_reason == "length"


def test_queue_full_raises_with_retry_after():
    """max_queued bounds the requests waiting BEYOND the free slots: those about to be admitted don't count."""
    sched = Scheduler(max_num_seqs=2, max_queued=5)
    for _ in range(7):  # 2 take the free slots at the next step, 5 wait
        sched.add(make())
    with pytest.raises(QueueFull) as err:
        sched.add(make())
    assert err.value.retry_after_s == sched.retry_after_s() == 4.0  # ceil(7 / 2) batches ahead
    assert sched.num_waiting == 7 and sched.room == 0
    sched.schedule()  # 2 admitted: the queue holds 5 behind 2 busy slots, still full
    assert sched.room == 0 and sched.num_running == 2
    assert Scheduler().retry_after_s() == 1.0  # at least one second, even with an empty queue


def test_no_queue_still_fills_the_free_slots():
    sched = Scheduler(max_num_seqs=3, max_queued=0)
    for _ in range(3):
        sched.add(make())
    with pytest.raises(QueueFull):
        sched.add(make())
    assert len(sched.schedule().prefill) == 3 and sched.room == 0


def test_too_long_request_is_rejected_with_both_numbers():
    sched = Scheduler(max_model_len=100)
    with pytest.raises(ValueError, match=r"90 tokens.*max_tokens \(20\).*110 tokens exceeds max_model_len 100"):
        sched.add(make(n_prompt=90, max_tokens=20))
    sched.add(make(n_prompt=90, max_tokens=10))  # exactly max_model_len fits
    assert sched.num_waiting == 1


def test_same_request_cannot_be_added_twice():
    sched = Scheduler()
    r = make()
    sched.add(r)
    with pytest.raises(ValueError, match="already added"):
        sched.add(r)


def test_scheduler_does_not_import_torch():
    code = "import sys, uniql.runtime.scheduler; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _check_invariants(sched: Scheduler, added: list[Request], max_num_seqs: int) -> None:
    waiting, running = set(ids(sched.waiting)), set(ids(sched.running))
    assert len(running) <= max_num_seqs
    assert not waiting & running
    for r in added:
        places = [r.request_id in waiting, r.request_id in running, r.finished]
        assert sum(places) == 1, (r.request_id, places)
        assert r.status is (Status.WAITING if places[0] else Status.RUNNING if places[1] else Status.FINISHED)


def test_random_add_cancel_finish_keeps_invariants():
    rng = random.Random(0)
    max_num_seqs = 4
    sched = Scheduler(max_num_seqs=max_num_seqs, max_queued=10, cache_budget=lambda r: rng.random() < 0.8)
    added: list[Request] = []
    seen_prefill: set[str] = set()
    for _ in range(1000):
        for _ in range(rng.randint(0, 3)):
            r = make(rung=rng.randint(0, 2))
            try:
                sched.add(r)
                added.append(r)
            except QueueFull:
                assert sched.num_waiting == 10 + max_num_seqs - sched.num_running
        if added and rng.random() < 0.3:
            victim = rng.choice(added)
            was_live = not victim.finished
            assert (sched.cancel(victim.request_id) is victim) == was_live  # None once it has finished
        step = sched.schedule()
        for r in step.prefill:
            assert r.request_id not in seen_prefill  # each request prefills exactly once
            seen_prefill.add(r.request_id)
        for r in decoded(step):
            assert r.request_id in seen_prefill and r not in step.prefill and not r.finished
        for r in decoded(step):
            if rng.random() < 0.2:
                sched.finish(r, "stop")
        _check_invariants(sched, added, max_num_seqs)
    assert any(r.finish_reason == "cancelled" for r in added) and any(r.finish_reason == "stop" for r in added)
