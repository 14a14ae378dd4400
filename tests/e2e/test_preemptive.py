"""Preemptive replies through the whole stack, every stage its own process: the answer to a
statement is prepared while the STT holds its final back, played only once the final agrees,
and never heard when the user goes on and the words change at the end."""

from __future__ import annotations

import wave
from pathlib import Path

import pytest
import pytest_asyncio

from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import read_wav
from tests.conftest import running_stack
from voicebus.client import Tap, dispatch, end_session
from voicebus.speech import say_to_wav

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

# A statement's final waits 3.5 s for more speech, so the user's 2.2 s pause below always falls
# inside the hold. The draft's first audio has the pause, less the VAD's silence and the
# decode, to be made before the user goes on: some 1.7 s, where Piper takes 0.2 s on an idle
# machine and has been seen to take 0.6 s on a loaded one.
HOLD_MS = 3500
PAUSE_MS = 2200


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def drafting_stack(tmp_path_factory: pytest.TempPathFactory):
    env = {"VOICEBUS_STT_EOT_STATEMENT_MS": str(HOLD_MS),
           "VOICEBUS_STT_PREEMPTIVE_MAX_HOLD_MS": str(HOLD_MS)}
    async for stack in running_stack(tmp_path_factory, livekit=False, env=env):
        yield stack


@pytest_asyncio.fixture(loop_scope="module")
async def bus_tap(drafting_stack):
    nc = await drafting_stack.connect()
    tap = Tap(nc)
    yield nc, tap
    await tap.close()
    await nc.drain()


async def _joined(first: str, second: str, folder: Path) -> Path:
    """One WAV: ``first``, a pause of ``PAUSE_MS``, then ``second``."""
    a = await say_to_wav(first, folder / "a.wav", lead_ms=400, tail_ms=PAUSE_MS)
    b = await say_to_wav(second, folder / "b.wav", lead_ms=0, tail_ms=300)
    (pcm_a, rate, _), (pcm_b, _, _) = read_wav(a), read_wav(b)
    path = folder / "joined.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm_a + pcm_b)
    return path


async def _talk(nc, tap: Tap, session: str, wav: Path, out: Path, turn: int) -> None:
    await tap.watch(sj.session_all(session))
    await dispatch(nc, tap, session, wav_in=[str(wav)], wav_out=str(out))
    try:
        await tap.wait_for(lambda: tap.of(ev.Playback, session, turn=turn, final=True), 60,
                           f"reply {turn} to be played")
    finally:
        await end_session(nc, session)


def _verdicts(tap: Tap, session: str) -> list[tuple[int, str, bool]]:
    return [(v.turn, v.action, v.draft) for v in tap.of(ev.Verdict, session)]


async def test_a_draft_the_final_contradicts_is_never_heard(bus_tap, tmp_path) -> None:
    nc, tap = bus_tap
    wav = await _joined("Please call my mother.", "And tell her I am late.", tmp_path)
    out = tmp_path / "reply.wav"
    await _talk(nc, tap, "changed", wav, out, turn=2)

    # The first words settled, and an answer to them was prepared: text and audio.
    settled = tap.of(ev.Transcript, "changed", turn=1, settled=True)
    assert settled and "mother" in settled[0].text
    assert (1, "answer", True) in _verdicts(tap, "changed")
    assert tap.of(ev.AudioFrame, "changed", turn=1), "the draft's audio was never made"
    # The user went on: turn 1 ends unanswered, its draft is cut, turn 2 has every word.
    (ended,) = tap.of(ev.Transcript, "changed", turn=1, final=True)
    assert ended.continued
    assert [c.turn for c in tap.of(ev.Cancel, "changed")] == [1]
    (final,) = tap.of(ev.Transcript, "changed", turn=2, final=True)
    assert "mother" in final.text and "late" in final.text, final.text
    assert (2, "answer", False) in _verdicts(tap, "changed")
    # Nothing of the draft was heard: turn 1 played nothing, and the reply the user heard is
    # exactly turn 2's.
    assert [p.played_ms for p in tap.of(ev.Playback, "changed", turn=1)] == [0]
    (played,) = tap.of(ev.Playback, "changed", turn=2, final=True)
    pcm, rate, _ = read_wav(out)
    assert played.played_ms > 0 and len(pcm) * 1000 // (2 * rate) == played.played_ms
    turn2 = b"".join(f.pcm for f in tap.of(ev.AudioFrame, "changed", turn=2))
    assert pcm == turn2[:len(pcm)]


async def test_a_confirmed_draft_plays_from_what_was_prepared(bus_tap, tmp_path) -> None:
    nc, tap = bus_tap
    wav = await say_to_wav("Please call my mother.", tmp_path / "q.wav", lead_ms=400)
    await _talk(nc, tap, "same", wav, tmp_path / "reply.wav", turn=1)

    assert _verdicts(tap, "same") == [(1, "answer", True), (1, "answer", False)]
    draft, confirmed = tap.of(ev.Verdict, "same", turn=1)
    frames = tap.of(ev.AudioFrame, "same", turn=1)
    heard = [p for p in tap.of(ev.Playback, "same", turn=1) if p.played_ms]
    # The reply was ready during the hold, and not one frame was played before the final.
    assert frames and frames[0].ts_ns < confirmed.ts_ns
    assert heard and heard[0].ts_ns >= confirmed.ts_ns
    assert not tap.of(ev.Cancel, "same")
    (done,) = tap.of(ev.ReplyDone, "same", turn=1)
    assert "mother" in done.text and not done.interrupted
