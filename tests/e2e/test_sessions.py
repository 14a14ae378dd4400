"""Regression: the sessions recorded in ``tests/sessions/`` (by an earlier build, with
``python -m tests.sessions.make``) replayed into each stage of today's build, one at a time.
Each must give an empty diff: a change to speech recognition, the replies, what is spoken, or
turn-taking shows up here as the lines of ``voicebus diff``.

A session recorded under another bus contract is refused by ``record.read_file``; the failure
says to record the folder again."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_asyncio

import proto
from tests.conftest import running_stack
from voicebus import record, replay

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

SESSIONS = sorted((Path(__file__).resolve().parents[1] / "sessions").glob("*.vbus"))
# At the recorded pace where timing is the input (the microphone's VAD edges; the judge's view
# of speech and audio); as fast as the stage takes it where only the order matters.
SPEEDS = {"stt": 1.0, "llm": 0.0, "tts": 0.0, "egress": 1.0}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def bus(tmp_path_factory: pytest.TempPathFactory):
    async for stack in running_stack(tmp_path_factory, livekit=False):
        nc = await stack.connect()
        yield nc
        await nc.drain()


async def test_the_folder_has_sessions_of_this_contract() -> None:
    assert SESSIONS, "tests/sessions/ has no recordings"
    for path in SESSIONS:
        try:
            recording = record.read_file(path)
        except record.RecordingError as exc:
            pytest.fail(f"{path.name}: {exc} (record it again: python -m tests.sessions.make)")
        assert recording.header.contract == proto.CONTRACT_VERSION


@pytest.mark.parametrize("stage", list(SPEEDS))
@pytest.mark.parametrize("path", SESSIONS, ids=[p.stem for p in SESSIONS])
async def test_a_recorded_session_replays_into_todays_build_unchanged(bus, path, stage) -> None:
    recording = record.read_file(path)
    done = await replay.replay(bus, recording, stage, speed=SPEEDS[stage])
    assert not done.waits, done.waits
    result = replay.diff(recording, await record.export(bus.jetstream(), done.session))
    assert result["stages"], result
    print(replay.render(result))
    assert not result["changed"], replay.render(result)
