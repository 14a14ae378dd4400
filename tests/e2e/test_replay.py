"""A session recorded by the stack's capture, exported, replayed into one stage of the running
stack and diffed: the same build gives no diff; a changed stage gives exactly its changes; bad
files and taken session ids are refused. Every stage its own process, real nats-server."""

from __future__ import annotations

import asyncio
import sys

import msgspec
import pytest
import pytest_asyncio

import proto
from proto import events as ev
from proto import subjects as sj
from tests.conftest import running_stack
from voicebus import record, replay
from voicebus.client import Tap, dispatch, end_session
from voicebus.speech import say_to_wav

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

SESSION = "recorded"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def recorded(tmp_path_factory: pytest.TempPathFactory):
    """A stack, and one two-question file session on it, exported from the capture."""
    folder = tmp_path_factory.mktemp("replay")
    wavs = [await say_to_wav(text, folder / f"q{i}.wav", lead_ms=400)
            for i, text in enumerate(("What time is it?", "Please call my mother."))]
    async for stack in running_stack(tmp_path_factory, livekit=False):
        nc = await stack.connect()
        tap = Tap(nc)
        await tap.watch(sj.session_all(SESSION))
        await dispatch(nc, tap, SESSION, wav_in=[str(w) for w in wavs])
        await tap.wait_for(lambda: len(tap.of(ev.Playback, SESSION, final=True)) >= 2, 90,
                           "both replies played")
        await end_session(nc, SESSION)
        await nc.flush()
        recording = await record.export(nc.jetstream(), SESSION)
        yield stack, nc, recording, folder
        await tap.close()
        await nc.drain()


async def test_the_capture_holds_the_session_in_order(recorded) -> None:
    _, _, recording, _ = recorded
    header = recording.header
    assert (header.format, header.contract, header.session) == \
        ("voicebus-recording", proto.CONTRACT_VERSION, SESSION)
    events = recording.events()
    kinds = [type(e).__name__ for _, _, e in events]
    assert kinds[0] == "FileSessionStart" and "AudioFrame" in kinds
    assert [e.turn for _, _, e in events if isinstance(e, ev.Transcript) and e.final] == [1, 2]
    assert [t for _, t, _ in events] == sorted(t for _, t, _ in events)
    again = record.loads(record.dumps(recording))  # the file round-trips whole
    assert again.entries == recording.entries


async def test_replaying_into_stt_with_the_same_build_changes_nothing(recorded) -> None:
    _, nc, recording, _ = recorded
    done = await replay.replay(nc, recording, "stt", speed=1.0)
    assert done.published > 100 and done.session != SESSION
    result = replay.diff(recording, await record.export(nc.jetstream(), done.session))
    assert result["stages"] == ["stt"]
    assert result["changes"] == [], replay.render(result)
    assert len(result["timings"]["replayed"]["stt_compute_ms"]) == 2


async def test_a_changed_llm_shows_exactly_its_changed_replies(recorded) -> None:
    """The LLM redeployed with another acknowledgement: the replay into it, as fast as it
    takes it, names the two replies (and nothing else); `voicebus diff` exits 1."""
    stack, nc, recording, folder = recorded
    old = stack.procs.pop("llm")
    await old.stop()
    await stack.start_stage("llm", 7, VOICEBUS_ECHO_ACK="understood.")
    await stack.wait_ready(("llm",))
    done = await replay.replay(nc, recording, "llm", speed=0)
    path = folder / "recorded.vbus"
    path.write_bytes(record.dumps(recording))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voicebus", "diff", str(path), done.session, "--json",
        "--nats", stack.nats_url, "--nkey", str(stack.seed_file("operator")),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, (out, err)
    result = msgspec.json.decode(out)
    assert result["stages"] == ["llm"], result
    changed = [(c["turn"], c["what"]) for c in result["changes"]]
    assert changed == [(1, "reply"), (2, "reply")], result
    assert all(c["after"].endswith("understood.") and c["before"].endswith("got it.")
               for c in result["changes"]), result


async def test_bad_files_and_taken_sessions_are_refused(recorded, tmp_path) -> None:
    stack, nc, recording, _ = recorded
    data = record.dumps(recording)
    with pytest.raises(record.RecordingError, match="truncated"):
        record.loads(data[: len(data) // 2])
    edited = msgspec.structs.replace(recording, entries=[
        *recording.entries[:3], record.Entry(recording.entries[3].subject, 0, b"\x00")])
    with pytest.raises(record.RecordingError, match="edited"):
        record.loads(msgspec.msgpack.encode(edited))
    other = msgspec.structs.replace(recording, header=msgspec.structs.replace(
        recording.header, contract=proto.CONTRACT_VERSION + 1))
    with pytest.raises(record.RecordingError, match="contract"):
        record.loads(record.dumps(other))
    with pytest.raises(replay.ReplayError, match="exists"):
        await replay.replay(nc, recording, "stt", session=SESSION)
    # Known to the stages though never captured (capture off, or purged): refused too.
    await record.purge(nc.jetstream(), SESSION)
    with pytest.raises(replay.ReplayError, match="exists"):
        await replay.replay(nc, recording, "stt", session=SESSION)
    with pytest.raises(replay.ReplayError, match="--into"):
        await replay.replay(nc, recording, "ingress")


async def test_a_session_is_purged_from_the_capture(recorded) -> None:
    stack, nc, recording, _ = recorded
    js = nc.jetstream()
    await record.import_file(js, recording)
    assert await record.export(js, SESSION) == recording  # the imported copy
    assert SESSION in await record.imported(js)
    await record.purge(js, SESSION)
    assert SESSION not in await record.sessions(js)
    assert SESSION not in await record.imported(js)
    with pytest.raises(record.RecordingError, match="no recording"):
        await record.export(js, SESSION)
