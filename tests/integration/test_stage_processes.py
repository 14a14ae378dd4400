"""Single stages as real processes on a real nats-server, driven through the bus."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import wave

import msgspec
import pytest

from proto import codec
from proto import events as ev
from proto import subjects as sj
from tests.fakes.openai_server import start_fake_openai
from voicebus import record
from voicebus.call import first_loud_sample
from voicebus.client import dispatch
from voicebus.launcher import free_port


async def publish(nc, topic: sj.Topic, event: ev.Event) -> None:
    await nc.publish(topic.subject(event.session), codec.encode(event))


async def user_says(nc, session: str, turn: int, text: str, *, seq: int = 1) -> None:
    """The user's speech edges and final transcript, as ingress and the STT publish them: the
    judge in egress turns them into a verdict (and cuts a reply that holds the floor)."""
    def stamp(cls: type[ev.Event], **fields) -> ev.Event:
        return cls(session=session, seq=seq, ts_ns=time.time_ns(), **fields)

    await publish(nc, sj.INGRESS_VAD, stamp(ev.SpeechStarted, pts_ms=0))
    await publish(nc, sj.INGRESS_VAD, stamp(ev.SpeechEnded, pts_ms=900, speech_ms=900))
    await publish(nc, sj.STT_FINAL, stamp(ev.Transcript, turn=turn, text=text, final=True,
                                          speech_ms=900))


def answer(session: str, turn: int, text: str) -> ev.Verdict:
    """The judge's verdict to answer the user's ``text``: what the LLM acts on."""
    return ev.Verdict(session=session, seq=turn, ts_ns=time.time_ns(), turn=turn,
                      action="answer", text=text)


async def test_llm_sends_system_prompt_and_kv_history_and_survives_a_dead_provider(bare_stack):
    stack, nc, tap = bare_stack
    fake = await start_fake_openai(api_key="test-key")
    try:
        await stack.start_stage("llm", VOICEBUS_LLM_PROVIDER="openai", OPENAI_API_KEY="test-key",
                                OPENAI_BASE_URL=fake.base_url, VOICEBUS_SYSTEM_PROMPT="Be brief.",
                                # No retry: the injected 500 must reach the turn as a failure.
                                VOICEBUS_LLM_RETRIES="0")
        await stack.wait_ready(("llm",))
        await tap.watch(sj.session_all("chat"))
        await dispatch(nc, tap, "chat", stages=("llm",))

        await publish(nc, sj.FLOOR_VERDICT, answer("chat", 1, "what time is it"))
        await tap.wait_for(lambda: tap.of(ev.ReplyDone, "chat", turn=1), 10, "reply 1")
        fake.fail_with_status(500, times=1)
        await publish(nc, sj.FLOOR_VERDICT, answer("chat", 2, "are you there"))
        failed = await tap.wait_for(lambda: tap.of(ev.ReplyDone, "chat", turn=2), 10, "reply 2")
        await publish(nc, sj.FLOOR_VERDICT, answer("chat", 3, "call my mother"))
        done = await tap.wait_for(lambda: tap.of(ev.ReplyDone, "chat", turn=3), 10, "reply 3")
    finally:
        await fake.close()

    # The failed turn is closed with an error, announced, and the conversation goes on.
    assert failed[0].error and not failed[0].text
    errors = tap.of(ev.StageError, "chat")
    assert errors and errors[0].stage == "llm" and errors[0].turn == 2 and errors[0].retryable
    assert done[0].text == "You said: call my mother." and not done[0].error
    assert "".join(d.text for d in tap.of(ev.ReplyDelta, "chat", turn=3)) == done[0].text
    sent = fake.requests[-1]["messages"]
    assert sent[0] == {"role": "system", "content": "Be brief."}
    assert [m["content"] for m in sent[1:]] == [
        "what time is it", "You said: what time is it.", "are you there", "call my mother"]


async def test_llm_keeps_a_dropped_draft_out_of_the_history_and_remembers_a_confirmed_one(
        bare_stack):
    stack, nc, tap = bare_stack
    fake = await start_fake_openai(api_key="test-key")
    try:
        await stack.start_stage("llm", VOICEBUS_LLM_PROVIDER="openai", OPENAI_API_KEY="test-key",
                                OPENAI_BASE_URL=fake.base_url, VOICEBUS_SYSTEM_PROMPT="Be brief.")
        await stack.wait_ready(("llm",))
        await tap.watch(sj.session_all("drafts"))
        await dispatch(nc, tap, "drafts", stages=("llm",))

        def draft(turn: int, text: str) -> ev.Verdict:
            return msgspec.structs.replace(answer("drafts", turn, text), draft=True)

        # Turn 1 is drafted and answered at once, then dropped: the user went on.
        await publish(nc, sj.FLOOR_VERDICT, draft(1, "please call my mother"))
        await tap.wait_for(lambda: tap.of(ev.ReplyDone, "drafts", turn=1), 10, "draft 1")
        await publish(nc, sj.FLOOR_CANCEL, ev.Cancel(session="drafts", seq=1, turn=1,
                                                     reason="continued"))
        # Turn 2 carries its words on; drafted, then confirmed while it is being written.
        fake.stall(0.5)
        await publish(nc, sj.FLOOR_VERDICT, draft(2, "please call my mother and tell her"))
        await tap.wait_for(lambda: len(fake.requests) == 2 or None, 10, "draft 2 asked")
        fake.reset()
        await publish(nc, sj.FLOOR_VERDICT, answer("drafts", 2, "please call my mother and tell her"))
        done = await tap.wait_for(lambda: tap.of(ev.ReplyDone, "drafts", turn=2), 10, "reply 2")
        await publish(nc, sj.FLOOR_VERDICT, answer("drafts", 3, "thanks"))
        await tap.wait_for(lambda: tap.of(ev.ReplyDone, "drafts", turn=3), 10, "reply 3")
    finally:
        await fake.close()

    # One reply, confirmed before its first word: the confirmation asked the model nothing.
    assert len(done) == 1 and not done[0].interrupted
    assert len(fake.requests) == 3
    sent = fake.requests[-1]["messages"]
    assert [m["content"] for m in sent[1:]] == [
        "please call my mother and tell her", "You said: please call my mother and tell her.",
        "thanks"]


async def test_egress_judges_a_barge_in_stops_at_once_and_never_plays_the_cut_turn(
        bare_stack, tmp_path):
    stack, nc, tap = bare_stack
    await stack.start_stage("egress")
    await stack.wait_ready(("egress",))
    out = tmp_path / "played.wav"
    await tap.watch(sj.session_all("cut"))
    await dispatch(nc, tap, "cut", stages=("egress",), wav_out=str(out))

    await user_says(nc, "cut", 1, "tell me a story")
    verdict = await tap.wait_for(lambda: tap.of(ev.Verdict, "cut", turn=1), 5, "a verdict")
    assert verdict[0].action == "answer" and verdict[0].text == "tell me a story"
    rate, frame = 16000, bytes(range(256)) * 2 + bytes(128)  # 640 bytes: 20 ms at 16 kHz
    seq = 100
    for turn, frames in ((1, 150), (2, 10)):  # a 3 s reply, then a short one
        for i in range(frames):
            seq += 1
            await publish(nc, sj.TTS_AUDIO, ev.AudioFrame(
                session="cut", seq=seq, ts_ns=time.time_ns(), pcm=frame, sample_rate=rate,
                pts_ms=20 * i, turn=turn, text_offset=i))
        if turn == 1:
            await tap.wait_for(lambda: tap.of(ev.Playback, "cut", turn=1), 5, "turn 1 playing")
            # The user talks over the reply: a real question cuts it.
            await user_says(nc, "cut", 2, "what time is it", seq=2)
            await tap.wait_for(lambda: tap.of(ev.Playback, "cut", turn=1, final=True), 5, "cut")
        seq += 1
        await publish(nc, sj.TTS_DONE, ev.SynthesisDone(session="cut", seq=seq, ts_ns=time.time_ns(),
                                                        turn=turn, frames=frames))
    # A late frame of the cancelled turn must never be played.
    await publish(nc, sj.TTS_AUDIO, ev.AudioFrame(session="cut", seq=seq + 1, ts_ns=time.time_ns(),
                                                  pcm=frame, sample_rate=rate, turn=1))
    second = await tap.wait_for(lambda: tap.of(ev.Playback, "cut", turn=2, final=True), 5, "turn 2")
    assert await stack.procs["egress"].stop() == 0  # closes the session's WAV on the way out

    cancels = tap.of(ev.Cancel, "cut", topic=sj.FLOOR_CANCEL)
    assert [(c.turn, c.reason) for c in cancels] == [(1, "barge-in")]
    assert [(v.turn, v.action) for v in tap.of(ev.Verdict, "cut")] == [(1, "answer"), (2, "answer")]
    cut = tap.of(ev.Playback, "cut", turn=1, final=True)[0]
    assert cut.interrupted and 0 < cut.played_ms < 3000  # not the whole of its 3 s
    assert second[0].played_ms == 200 and not second[0].interrupted
    with wave.open(str(out)) as wav:
        played_ms = wav.getnframes() * 1000 // wav.getframerate()
    assert played_ms == cut.played_ms + 200

    # The capture gives the call back as the user heard it: 3 s of reply 1 were synthesized,
    # but the agent's channel carries only what played before the user cut in, then reply 2.
    _, agent = record.conversation_audio(await record.export(nc.jetstream(), "cut"))
    windows = agent[: len(agent) // 320 * 320].reshape(-1, 320).any(axis=1)  # 20 ms each
    sounding_ms = int(windows.sum()) * 20
    assert abs(sounding_ms - (cut.played_ms + 200)) <= 40, (sounding_ms, cut.played_ms)


async def test_egress_reports_whole_timed_words_as_heard(bare_stack):
    """With word timings from the TTS, Playback says which words were heard, not an estimate."""
    stack, nc, tap = bare_stack
    # Egress is alone here: nothing answers turn 2 (the barge-in), so on SIGTERM it would wait
    # out the whole shutdown grace (10 s) for that turn before exiting (0 either way).
    await stack.start_stage("egress", VOICEBUS_EGRESS_PROGRESS_MS="100",
                            VOICEBUS_SHUTDOWN_GRACE="1")
    await stack.wait_ready(("egress",))
    await tap.watch(sj.session_all("words"))
    await dispatch(nc, tap, "words", stages=("egress",))
    await user_says(nc, "words", 1, "count to ten")

    text = "one two three four five six seven eight nine ten"
    frames, rate = 150, 16000  # 3 s; a word ends every 300 ms
    ends = [i + len(w) for i, w in ((text.index(w), w) for w in text.split())]
    marks = [ev.WordMark(end_ms=300 * (n + 1), text_end=end) for n, end in enumerate(ends)]
    for i in range(frames):  # offsets that a proportional estimate could give: never on a word
        await publish(nc, sj.TTS_AUDIO, ev.AudioFrame(
            session="words", seq=i + 1, ts_ns=time.time_ns(), pcm=bytes(640), sample_rate=rate,
            pts_ms=20 * i, turn=1, text_offset=(i + 1) * len(text) // frames))
    await publish(nc, sj.TTS_DONE, ev.SynthesisDone(
        session="words", seq=frames + 1, ts_ns=time.time_ns(), turn=1, frames=frames, text=text,
        words=marks))
    await tap.wait_for(lambda: [p for p in tap.of(ev.Playback, "words", turn=1)
                                if p.played_ms >= 700], 10, "two words played")
    await user_says(nc, "words", 2, "stop counting please", seq=2)
    await tap.wait_for(lambda: tap.of(ev.Playback, "words", turn=1, final=True), 5, "the cut")

    reports = tap.of(ev.Playback, "words", turn=1)
    cut = reports[-1]
    assert cut.final and cut.interrupted and 700 <= cut.played_ms < 3000
    heard = [end for end, mark in zip(ends, marks, strict=True) if mark.end_ms <= cut.played_ms]
    assert cut.text_offset == heard[-1] and text[:cut.text_offset].split() == \
        text.split()[:len(heard)]
    # Every report after the timings arrived stands on a word's end (or the start).
    assert all(p.text_offset in (0, *ends) for p in reports if p.played_ms >= 700)


async def test_llm_cancel_closes_the_provider_stream_and_closes_the_turn(bare_stack):
    stack, nc, tap = bare_stack
    fake = await start_fake_openai(api_key="test-key")
    try:
        await stack.start_stage("llm", VOICEBUS_LLM_PROVIDER="openai", OPENAI_API_KEY="test-key",
                                OPENAI_BASE_URL=fake.base_url)
        await stack.wait_ready(("llm",))
        await tap.watch(sj.session_all("bargein"))
        await dispatch(nc, tap, "bargein", stages=("llm",))
        fake.reply = "One two three four five six seven eight."
        fake.hold_after(2)  # the model "keeps thinking" after two chunks
        await publish(nc, sj.FLOOR_VERDICT, answer("bargein", 1, "count for me"))
        await tap.wait_for(lambda: len(tap.of(ev.ReplyDelta, "bargein", turn=1)) >= 2, 10, "deltas")
        await publish(nc, sj.FLOOR_CANCEL, ev.Cancel(session="bargein", seq=9, ts_ns=time.time_ns(),
                                                   turn=1))
        done = await tap.wait_for(lambda: tap.of(ev.ReplyDone, "bargein", turn=1), 10, "done")
        await asyncio.wait_for(fake.stopped.wait(), 10)
    finally:
        await fake.close()
    assert done[0].interrupted and done[0].text == "One two "


async def test_tts_cancel_stops_synthesis_and_ignores_late_text(bare_stack):
    stack, nc, tap = bare_stack
    await stack.start_stage("tts")
    await stack.wait_ready(("tts",))
    await tap.watch(sj.session_all("speak"))
    await dispatch(nc, tap, "speak", stages=("tts",))
    seq = iter(range(1, 1000))

    async def reply(turn: int, text: str, done: bool) -> None:
        await publish(nc, sj.LLM_DELTA, ev.ReplyDelta(session="speak", seq=next(seq),
                                                      ts_ns=time.time_ns(), turn=turn, text=text))
        if done:
            await publish(nc, sj.LLM_DONE, ev.ReplyDone(session="speak", seq=next(seq),
                                                        ts_ns=time.time_ns(), turn=turn, text=text))

    # Long enough that synthesis cannot finish before the cancel lands, even on a busy machine.
    long = " ".join(f"This is sentence number {n} of a long answer." for n in range(1, 61))
    await reply(1, long, done=True)
    await tap.wait_for(lambda: tap.of(ev.AudioFrame, "speak", topic=sj.TTS_AUDIO, turn=1), 10,
                       "the first audio of turn 1")
    cancel = ev.Cancel(session="speak", seq=next(seq), ts_ns=time.time_ns(), turn=1)
    await publish(nc, sj.FLOOR_CANCEL, cancel)
    cut = await tap.wait_for(lambda: tap.of(ev.SynthesisDone, "speak", turn=1), 10, "turn 1 closed")
    await reply(1, "Late words of the cancelled turn.", done=False)
    await reply(2, "Short answer.", done=True)
    second = await tap.wait_for(lambda: tap.of(ev.SynthesisDone, "speak", turn=2), 10, "turn 2")

    assert cut[0].interrupted and not second[0].interrupted and second[0].frames > 0
    frames_1 = tap.of(ev.AudioFrame, "speak", topic=sj.TTS_AUDIO, turn=1)
    # Sixty sentences are ~2.5 min of speech; synthesis stopped at the cancel. Piper gives a
    # sentence (~2.3 s, 116 frames) at a time: after the cancel at most the one being made went
    # out (none, in every run seen), however long the test took to send the cancel.
    assert 0 < len(frames_1) == cut[0].frames
    assert len([f for f in frames_1 if f.ts_ns > cancel.ts_ns]) <= 150, len(frames_1)
    assert len(tap.of(ev.SynthesisDone, "speak", turn=1)) == 1


@pytest.mark.parametrize(("stage", "chain", "key"), [
    ("stt", "deepgram,pocketsphinx", "DEEPGRAM_API_KEY"),
    ("llm", "openai,echo", "OPENAI_API_KEY"),
    ("tts", "cartesia,piper", "CARTESIA_API_KEY"),
])
async def test_a_missing_key_stops_the_start_even_without_nats(stage, chain, key):
    """The configuration is checked before the bus: nothing listens on the NATS port, and the
    stage still says at once which variable is missing, and exits 1."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update({f"VOICEBUS_{stage.upper()}_PROVIDERS": chain,
                "VOICEBUS_NATS_URL": f"nats://127.0.0.1:{free_port()}"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", f"services.{stage}", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, err.decode()
    assert f"voicebus {stage}: configuration error" in err.decode() and key in err.decode()


async def test_tts_replies_start_at_their_first_sound(bare_stack):
    """Piper puts 40-70 ms of quiet before these replies (now and then 200-450 ms): the TTS
    stage cuts it, so each reply's first frame is within a few ms of its first sound."""
    stack, nc, tap = bare_stack
    await stack.start_stage("tts")  # Piper with its random variation, as deployed
    await stack.wait_ready(("tts",))
    await tap.watch(sj.session_all("lead"))
    await dispatch(nc, tap, "lead", stages=("tts",))
    replies = ["Where is the nearest train station?", "Have a nice day.", "How are you?"]
    for turn, text in enumerate(replies, start=1):
        await publish(nc, sj.LLM_DELTA, ev.ReplyDelta(session="lead", seq=2 * turn - 1,
                                                      ts_ns=time.time_ns(), turn=turn, text=text))
        await publish(nc, sj.LLM_DONE, ev.ReplyDone(session="lead", seq=2 * turn,
                                                    ts_ns=time.time_ns(), turn=turn, text=text))
        await tap.wait_for(lambda turn=turn: tap.of(ev.SynthesisDone, "lead", turn=turn), 20,
                           f"reply {turn} spoken")
    leads = {}
    for turn in range(1, len(replies) + 1):
        frames = sorted(tap.of(ev.AudioFrame, "lead", topic=sj.TTS_AUDIO, turn=turn),
                        key=lambda f: f.pts_ms)
        leads[turn] = first_loud_sample(b"".join(f.pcm for f in frames)) * 1000 / \
            frames[0].sample_rate
    assert all(lead < 35 for lead in leads.values()), leads
