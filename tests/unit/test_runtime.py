"""Small shared pieces: log throttling, JSON logs, sequence gaps, TTS framing."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys

import pytest
from prometheus_client import REGISTRY

from proto import events as ev
from services.runtime import metrics, service
from services.runtime.bus import SeqGaps
from services.runtime.logs import JsonFormatter, Throttle, redact
from services.tts.service import _Framer


def test_a_stage_asks_for_the_gil_back_sooner_than_python_does(monkeypatch) -> None:
    """A stage's loop waits at most 0.5 ms, not CPython's 5, for a thread of its own that
    runs Python to hand the GIL back."""
    seen: list[float] = []

    def run(work) -> None:  # where the stage would run; what it runs with is the point
        work.close()
        seen.append(sys.getswitchinterval())

    before = sys.getswitchinterval()
    monkeypatch.setattr(asyncio, "run", run)
    monkeypatch.setattr(service, "exit_process", lambda code: None)
    try:
        service.main(service.StageService)
    finally:
        sys.setswitchinterval(before)
    assert seen == [service.GIL_SWITCH_S] and seen[0] < before


def test_what_a_replica_loaded_is_kept_out_of_every_later_collection() -> None:
    """Once settled, the heap a stage started with is frozen: a collection no longer scans it.
    What is made afterwards (a session's objects) is collected as before."""
    loaded = [object()]  # like a model's tables, kept for the process's life
    replica = service.StageService.__new__(service.StageService)
    replica.stage = "settle-test"
    try:
        replica.settle_heap()
        made_after = [object()]
        scanned = gc.get_objects()
        assert not any(obj is loaded for obj in scanned)
        assert any(obj is made_after for obj in scanned)
        frozen = REGISTRY.get_sample_value("voicebus_gc_frozen_objects", {"stage": "settle-test"})
        assert frozen == gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


async def test_a_lease_refresh_failing_through_an_election_is_counted_and_logged_once(
        caplog) -> None:
    """JetStream without a leader fails every refresh, four a second per session: each is
    counted, one line says so."""
    class Unanswered:
        ttl = 1

        async def refresh(self, session: str, revision: int) -> int:
            raise TimeoutError("nats: no response from stream")

    replica = service.StageService.__new__(service.StageService)
    replica.stage = "lease-test"
    replica.leases, replica.workers, replica._lease_rev = Unanswered(), {}, {}
    replica._lease_log = service.Throttle()
    labels = {"stage": "lease-test"}
    before = REGISTRY.get_sample_value("voicebus_lease_refresh_failures_total", labels) or 0.0
    with caplog.at_level(logging.WARNING, logger="services.runtime.service"):
        for _ in range(12):
            await replica._refresh("s1")
    assert REGISTRY.get_sample_value("voicebus_lease_refresh_failures_total", labels) == before + 12
    said = [r.getMessage() for r in caplog.records if "lease refresh failed" in r.getMessage()]
    assert said == ["lease refresh failed: nats: no response from stream"]


async def test_a_claim_stores_the_sessions_start_before_it_takes_the_lease() -> None:
    """A lease is renewed only once its session is claimed. Were the start stored after the
    lease was taken, a store waiting out a JetStream election would outlast the lease, and a
    lease that lapsed before its start was stored could not be taken over."""
    done: list[str] = []

    class Bus:
        async def put(self, bucket: object, key: str, value: bytes) -> None:
            done.append(f"stored {key}")

        async def publish(self, subject: str, event: object) -> None:
            done.append("ready")

    class Leases:
        async def acquire(self, session: str) -> int:
            done.append(f"leased {session}")
            return 7

    class Worker:
        session, start_event = "s1", ev.SessionStart(session="s1")

        async def subscribe_inputs(self) -> None:
            done.append("subscribed")

        async def on_claimed(self) -> None:
            pass

        def event(self, kind: type, **fields: object) -> object:
            return kind(session=self.session, **fields)

    replica = service.StageService.__new__(service.StageService)
    replica.stage, replica.replica, replica.state = "llm", "llm-a", object()
    replica.bus, replica.leases = Bus(), Leases()
    replica.workers, replica._lease_rev, replica._claiming, replica._ended = {}, {}, {"s1"}, {}
    worker = Worker()
    await replica._claim(worker)
    assert done == ["subscribed", "stored s1.start", "leased s1", "ready"]
    assert replica.workers == {"s1": worker} and replica._lease_rev == {"s1": 7}


async def test_a_release_held_up_by_an_election_is_waited_for_no_longer_than_the_lease_lives(
        caplog) -> None:
    """The lease expires on its own within its TTL: a handover or a shutdown does not wait
    out a JetStream election (a delete with no leader waits nats-py's 5 s) to delete it
    sooner."""
    class Unanswered:
        ttl = 0.2

        async def release(self, session: str) -> None:
            await asyncio.sleep(30)

    replica = service.StageService.__new__(service.StageService)
    replica.stage, replica.leases, replica.workers, replica._lease_rev = "llm", Unanswered(), {}, {}
    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.WARNING, logger="services.runtime.service"):
        await replica._release("s1")
    assert loop.time() - started < 5
    assert [r.getMessage() for r in caplog.records] == ["could not release lease: TimeoutError"]


async def test_a_refresh_that_lost_its_lease_to_a_release_does_not_take_it_back() -> None:
    """The session was released (ended, handed over) while a refresh was in flight: the
    refresh finds the key changed, and must not acquire the lease again, which would make the
    successor refuse the session until it expired."""
    from nats.js.errors import KeyWrongLastSequenceError

    acquired: list[str] = []

    class Released:
        ttl = 1

        async def refresh(self, session: str, revision: int) -> int:
            raise KeyWrongLastSequenceError(description="deleted")

        async def acquire(self, session: str) -> int:
            acquired.append(session)
            return 9

    replica = service.StageService.__new__(service.StageService)
    replica.stage, replica.leases, replica._lease_rev = "llm", Released(), {"s1": 4}
    replica.workers = {}
    replica._lease_log = service.Throttle()
    await replica._refresh("s1")
    assert acquired == []
    replica.workers = {"s1": object()}  # still ours: a lapsed lease is taken back
    await replica._refresh("s1")
    assert acquired == ["s1"] and replica._lease_rev["s1"] == 9


async def test_a_release_racing_a_refresh_deletes_the_newer_revision() -> None:
    """Our refresh lands between the release's read and its delete: the delete by revision is
    refused (10164 on a clustered stream, 10071 on one node), and is made again over the
    refresh's revision rather than given up, which would leave our lease in the successor's
    way."""
    from types import SimpleNamespace

    from nats.js.errors import APIError

    from services.runtime.leases import Leases

    revisions, deletes = iter([5, 6]), []

    class Js:
        async def get_msg(self, stream: str, subject: str) -> SimpleNamespace:
            return SimpleNamespace(seq=next(revisions), data=b"llm-a", headers=None)

    class Kv:
        async def delete(self, key: str, last: int) -> None:
            deletes.append(last)
            if last == 5:
                raise APIError(code=400, err_code=10164, description="wrong last sequence")

    leases = Leases(SimpleNamespace(js=Js()), "llm", "llm-a", ttl=1)
    leases.kv = Kv()
    await leases.release("s1")
    assert deletes == [5, 6]


def test_each_garbage_collection_is_timed_by_generation() -> None:
    hooks = list(gc.callbacks)
    labels = {"stage": "gc-test", "generation": "2"}
    try:
        metrics.watch_gc("gc-test")
        before = REGISTRY.get_sample_value("voicebus_gc_pause_seconds_count", labels)
        gc.collect()
        assert REGISTRY.get_sample_value("voicebus_gc_pause_seconds_count", labels) == before + 1
        assert REGISTRY.get_sample_value("voicebus_gc_pause_seconds_sum", labels) > 0
    finally:
        gc.callbacks[:] = hooks  # this test's hook goes with it


def test_throttle_allows_one_line_per_interval_and_counts_the_rest(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr("services.runtime.logs.time.monotonic", lambda: now[0])
    throttle = Throttle(interval=5.0)
    assert throttle.allow("decode") == 0
    assert [throttle.allow("decode") for _ in range(3)] == [None, None, None]
    assert throttle.allow("wrong_kind") == 0  # keys are independent
    now[0] += 5.0
    assert throttle.allow("decode") == 3


def test_json_log_lines_carry_the_context() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "bad %s", ("frame",), None)
    record.stage, record.session = "stt", "s1"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "bad frame" and line["stage"] == "stt" and line["session"] == "s1"
    assert line["level"] == "WARNING"


def test_secrets_are_redacted_from_a_librarys_log_with_one_filter(caplog) -> None:
    library = logging.getLogger("tests.a-websocket-client")
    redact(library, "sk-one")
    redact(library, "sk-two")
    redact(library, "sk-one")  # a second provider with the same key
    redact(library, "")        # no key configured: nothing to hide
    with caplog.at_level(logging.DEBUG, logger=library.name):
        library.debug("> Authorization: %s, xi-api-key: %s", "Bearer sk-one", "sk-two")
        library.debug("nothing secret")
    assert [r.getMessage() for r in caplog.records] == [
        "> Authorization: Bearer <redacted>, xi-api-key: <redacted>", "nothing secret"]
    assert len(library.filters) == 1


def test_seq_gaps_count_lost_events_and_ignore_reordering() -> None:
    gaps = SeqGaps()
    seqs = [5, 6, 9, 8, 10, 14]
    lost = [gaps.lost(ev.Cancel(session="s", seq=n, turn=0)) for n in seqs]
    assert lost == [0, 0, 2, 0, 0, 3]


def test_tts_framer_cuts_exact_frames_and_reports_progress_through_each_piece() -> None:
    framer = _Framer(22050)  # 20 ms = 441 samples = 882 bytes
    first = framer.cut(bytes(1000))
    assert [len(f) for f, _ in first] == [882] and first[0][1] == 882 / 1000
    second = framer.cut(bytes(2000))  # 118 carried + 2000 = 2118: two frames, 354 left
    assert [len(f) for f, _ in second] == [882, 882]
    assert [round(share, 3) for _, share in second] == [round(764 / 2000, 3), round(1646 / 2000, 3)]
    tail = framer.flush()
    assert tail is not None and len(tail) == 882 and framer.flush() is None


async def test_a_jetstream_request_waits_out_a_leader_election_and_no_more() -> None:
    from nats.js.errors import NoStreamResponseError

    from services.runtime.bus import Bus

    answers = [NoStreamResponseError(), NoStreamResponseError(), 7]

    async def put() -> int:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert await Bus.jetstream(put, within=5.0) == 7  # two refusals, then the new leader

    async def never() -> int:
        raise NoStreamResponseError()

    with pytest.raises(NoStreamResponseError):
        await Bus.jetstream(never, within=0.2)  # no leader for longer: the error

    async def wrong() -> int:
        raise ValueError("not an election")

    with pytest.raises(ValueError):
        await Bus.jetstream(wrong)  # any other error at once
