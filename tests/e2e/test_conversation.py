"""A spoken question on NATS comes back as a spoken answer: every stage its own process."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import pytest_asyncio

from proto import events as ev
from proto import subjects as sj
from voicebus.client import dispatch, end_session
from voicebus.speech import say_to_wav, transcribe_wav

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

# What Piper says, and the words pocketsphinx must hear in it.
# (Piper's voice varies from run to run; these are the phrases pocketsphinx hears reliably.)
QUESTIONS = {
    "time": ("What time is it?", {"what", "time"}),
    "dog": ("Tell me a story about a dog.", {"story", "dog"}),
    "mother": ("Please call my mother.", {"call", "mother"}),
}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def questions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("questions")
    return {key: await say_to_wav(text, folder / f"{key}.wav", lead_ms=400)
            for key, (text, _) in QUESTIONS.items()}


def _words(text: str) -> set[str]:
    return set(text.lower().replace(".", " ").replace(",", " ").split())


async def test_two_sessions_talk_at_once_without_mixing(stack, bus, tap, questions, tmp_path):
    sessions = {"alice": ["time", "dog"], "bob": ["mother"]}
    for name in sessions:
        await tap.watch(sj.session_all(name))
    replies = {name: tmp_path / f"{name}.wav" for name in sessions}
    await asyncio.gather(*(
        dispatch(bus, tap, name, wav_in=[str(questions[q]) for q in qs], wav_out=str(replies[name]))
        for name, qs in sessions.items()
    ))

    def all_played() -> bool:
        return all(len(tap.of(ev.Playback, name, final=True)) >= len(qs)
                   for name, qs in sessions.items())

    try:
        await tap.wait_for(all_played, 90, "every reply to be played")
    finally:
        for name in sessions:
            await end_session(bus, name)

    for name, keys in sessions.items():
        _check_session(tap, name, keys)
    heard = {name: _words(await transcribe_wav(path)) for name, path in replies.items()}
    assert {"time", "dog"} <= heard["alice"], heard
    assert "mother" in heard["bob"], heard
    # Nothing of one conversation leaks into the other.
    assert not {"time", "dog"} & heard["bob"], heard
    assert "mother" not in heard["alice"], heard


def _check_session(tap, session: str, keys: list[str]) -> None:
    n = len(keys)
    assert len(tap.of(ev.SpeechStarted, session)) == n
    assert len(tap.of(ev.SpeechEnded, session)) == n
    finals = tap.of(ev.Transcript, session, final=True)
    assert [f.turn for f in finals] == list(range(1, n + 1))
    assert tap.of(ev.Transcript, session, final=False), "no partial transcripts"
    for final, key in zip(finals, keys):
        expected = QUESTIONS[key][1]
        assert expected <= _words(final.text), (final.text, expected)
    for turn in range(1, n + 1):
        deltas = tap.of(ev.ReplyDelta, session, turn=turn)
        done = tap.of(ev.ReplyDone, session, turn=turn)
        assert deltas and len(done) == 1
        assert "".join(d.text for d in deltas) == done[0].text
        assert done[0].text.lower().rstrip().endswith("got it.")
        tts_frames = tap.of(ev.AudioFrame, session, topic=sj.TTS_AUDIO, turn=turn)
        speech = tap.of(ev.SynthesisDone, session, turn=turn)
        assert len(speech) == 1 and speech[0].frames == len(tts_frames) > 10
        played = tap.of(ev.Playback, session, turn=turn, final=True)
        assert len(played) == 1 and not played[0].interrupted
        assert played[0].played_ms == 20 * len(tts_frames)
        assert played[0].frames_dropped == 0


async def test_the_session_command_talks_to_a_running_stack(stack, questions, tmp_path):
    reply = tmp_path / "reply.wav"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voicebus", "session", "--nats", stack.nats_url,
        "--nkey", str(stack.seed_file("operator")), "--wav", str(questions["mother"]), "--out", str(reply),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "please call my mother" in text and "Please call my mother... got it." in text
    assert "mother" in _words(await transcribe_wav(reply))
