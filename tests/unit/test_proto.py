"""The bus contract: round-trips, stable tags, subjects, and what gets rejected."""

from __future__ import annotations

import json

import msgspec
import pytest

import proto
from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.egress.service import heard_offset
from services.runtime.audio import frame_problem

SAMPLES = [
    ev.AudioFrame(session="s1", seq=1, ts_ns=2, pcm=bytes(640), sample_rate=16000, pts_ms=20),
    ev.SpeechStarted(session="s1", seq=2, ts_ns=3, pts_ms=100),
    ev.SpeechEnded(session="s1", seq=3, ts_ns=4, pts_ms=900, speech_ms=800,
                   timing=ev.Timing(last_speech_ts_ns=9)),
    ev.InputTrack(session="s1", seq=4, ts_ns=4, participant="u", track_sid="TR", active=True),
    ev.Transcript(session="s1", seq=1, ts_ns=5, turn=1, text="hello", final=True,
                  timing=ev.Timing(compute_ms=12.5, hold_ms=200)),
    ev.UserIdle(session="s1", seq=2, ts_ns=5, turn=2, count=1),
    ev.Verdict(session="s1", seq=1, ts_ns=5, turn=1, action="answer", text="hello"),
    ev.ReplyDelta(session="s1", seq=1, ts_ns=6, turn=1, text="Hi ", index=0),
    ev.ReplyDone(session="s1", seq=2, ts_ns=7, turn=1, text="Hi there."),
    ev.SynthesisDone(session="s1", seq=9, ts_ns=8, turn=1, frames=40, text="Hi there.",
                     words=[ev.WordMark(end_ms=300, text_end=2), ev.WordMark(end_ms=700, text_end=9)],
                     timing=ev.Timing(first_frame_ts_ns=7, llm_ms=1.5, tts_ms=80.0)),
    ev.Playback(session="s1", seq=1, ts_ns=9, turn=1, played_ms=800, final=True),
    ev.SessionStart(session="s1", seq=1, ts_ns=1, room="s1", greeting="Hi."),
    ev.FileSessionStart(session="s1", seq=1, ts_ns=1, wav_in=("/a.wav",), wav_out="/b.wav"),
    ev.PhoneSessionStart(session="s1", seq=1, ts_ns=1, caller="+15550100", sample_rate=8000),
    ev.Dtmf(session="s1", seq=1, ts_ns=1, digit="#"),
    ev.UserText(session="s1", seq=5, ts_ns=1, text="Book a table for two.", participant="u"),
    ev.SessionEnd(session="s1", seq=2, ts_ns=1, reason="bye"),
    ev.Cancel(session="s1", seq=3, ts_ns=1, turn=2),
    ev.AgentState(session="s1", seq=4, ts_ns=1, state="thinking", turn=2),
    ev.StageReady(session="s1", seq=1, ts_ns=1, stage="stt", replica="r1"),
    ev.ToolUse(session="s1", seq=1, ts_ns=1, turn=2, call_id="call_1", name="get_time",
               done=True, result='{"time": "12:00"}', ms=3.5),
    ev.StageError(session="s1", seq=1, ts_ns=1, stage="llm", turn=1, message="down"),
    ev.PhoneAction(session="s1", seq=2, ts_ns=1, turn=2, call_id="call_2", action="dtmf",
                   digits="12#"),
    ev.PhoneActionDone(session="s1", seq=6, ts_ns=1, call_id="call_2"),
    ev.Usage(session="s1", seq=1, ts_ns=1, stage="llm", provider="openai", turn=2, requests=1,
             input_tokens=120, output_tokens=12, cached_tokens=100, cost_usd=0.0000123),
]


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_every_event_round_trips(event: ev.Event) -> None:
    assert codec.decode(codec.encode(event)) == event


def test_wire_tags_are_stable() -> None:
    # Renaming a class must never change the wire: these strings are the contract.
    tags = {type(e).__name__: type(e).__struct_config__.tag for e in SAMPLES}
    assert tags == {
        "AudioFrame": "audio", "SpeechStarted": "vad.start", "SpeechEnded": "vad.end",
        "InputTrack": "ingress.track", "Dtmf": "ingress.dtmf", "UserText": "ingress.text", "Transcript": "stt.transcript", "UserIdle": "stt.idle",
        "Verdict": "floor.verdict", "ReplyDelta": "llm.delta", "ReplyDone": "llm.done",
        "ToolUse": "llm.tool", "SynthesisDone": "tts.done", "Playback": "egress.playback", "SessionStart": "ctl.start",
        "FileSessionStart": "dev.start", "PhoneSessionStart": "sip.start",
        "SessionEnd": "ctl.end", "Cancel": "ctl.cancel",
        "AgentState": "ctl.state", "StageReady": "ctl.ready", "StageError": "ctl.error",
        "PhoneAction": "llm.phone", "PhoneActionDone": "sip.action.done", "Usage": "usage",
    }
    # Every event type of the contract is sampled here.
    assert set(tags) == {cls.__name__ for cls in ev.AnyEvent.__args__}


def test_the_contract_has_a_version_and_every_subject_one_producer() -> None:
    assert proto.CONTRACT_VERSION == 2
    for (producer, kind), topic in sj.TOPICS.items():
        assert topic.producer == producer and topic.subject("s").split(".")[2] == producer
    # The judge's decisions are the floor's alone; dispatch speaks only on ctl.
    assert {t.kind for t in sj.TOPICS.values() if t.producer == "floor"} == \
        {"verdict", "cancel", "state", "end"}
    assert {t.kind for t in sj.TOPICS.values() if t.producer == "ctl"} == {"start", "end"}


def test_measurements_ride_only_in_the_timing_record() -> None:
    # Data events carry no loose measurement fields any more.
    loose = {"compute_ms", "hold_ms", "llm_ms", "tts_ms", "first_frame_ts_ns",
             "last_speech_ts_ns"}
    for cls in ev.AnyEvent.__args__:
        assert not loose & set(cls.__struct_fields__), cls.__name__


def test_a_file_session_start_is_a_session_start_on_the_dispatch_subject() -> None:
    start = SAMPLES[[type(e) for e in SAMPLES].index(ev.FileSessionStart)]
    decoded = codec.decode_on(sj.CTL_START.subject("s1"), codec.encode(start))
    assert isinstance(decoded, ev.SessionStart) and decoded.wav_in == ("/a.wav",)


def test_audio_stays_raw_bytes_on_the_wire() -> None:
    frame = SAMPLES[0]
    encoded = codec.encode(frame)
    assert bytes(640) in encoded and len(encoded) < 640 + 120


def test_older_reader_ignores_new_fields_and_new_reader_defaults_missing_ones() -> None:
    class NewTranscript(ev.Event, frozen=True, tag="stt.transcript"):
        turn: int
        text: str
        language: str = "en"  # a field added later, last, with a default

    wire = msgspec.msgpack.encode(NewTranscript(session="s", turn=1, text="hi", language="de"))
    assert codec.decode(wire) == ev.Transcript(session="s", turn=1, text="hi")


def test_subjects_build_and_parse() -> None:
    subject = sj.STT_FINAL.subject("room-1_a")
    assert subject == "voice.room-1_a.stt.final"
    assert sj.parse(subject) == ("room-1_a", sj.STT_FINAL)
    assert sj.session_all("x") == "voice.x.>"
    assert sj.producer_all("x", "llm") == "voice.x.llm.*"
    assert sj.CTL_START.every_session() == "voice.*.ctl.start"
    assert sj.FLOOR_VERDICT.subject("x") == "voice.x.floor.verdict"
    assert sj.HANDOVER["stt"].subject("x") == "voice.x.stt.handover"
    assert sj.every_stage("ready") == "voice.*.*.ready"
    assert sj.parse(sj.READY["tts"].subject("x")) == ("x", sj.READY["tts"])


@pytest.mark.parametrize("bad", ["voice.a.b", "voice.s.stt.nope", "other.s.stt.final",
                                 "voice.s.stt.final.x", "voice." + "x" * 65 + ".stt.final",
                                 "voice.bad$id.stt.final", "voice.demo\n.stt.final",
                                 "voice.s.ctl.cancel", "voice.s.ctl.state"])
def test_bad_subjects_are_refused(bad: str) -> None:
    with pytest.raises(sj.BadSubject):
        sj.parse(bad)


def test_session_ids_are_checked_when_building() -> None:
    with pytest.raises(sj.BadSubject):
        sj.STT_FINAL.subject("no spaces")
    with pytest.raises(sj.BadSubject):
        sj.session_all("a.b")
    with pytest.raises(sj.BadSubject):
        sj.STT_FINAL.subject("demo\n")  # ``$`` would let a final newline through


@pytest.mark.parametrize(
    ("subject", "payload", "reason"),
    [
        ("voice.s1.stt.final", b"\xc1garbage", "decode"),
        ("voice.s1.stt.final", b"", "decode"),
        ("voice.s1.stt.final", codec.encode(SAMPLES[1]), "wrong_kind"),
        ("voice.s2.ingress.audio", codec.encode(SAMPLES[0]), "session_mismatch"),
        ("voice.s1.nope.audio", codec.encode(SAMPLES[0]), "subject"),
        # Well-formed but odd audio passes the codec: the consuming stage judges formats.
        ("voice.s1.ingress.audio", codec.encode(ev.AudioFrame(session="s1", pcm=b"", sample_rate=1)),
         None),
    ],
)
def test_decode_on_rejects_what_does_not_belong(subject: str, payload: bytes, reason) -> None:
    if reason is None:
        assert isinstance(codec.decode_on(subject, payload), ev.AudioFrame)
        return
    with pytest.raises(codec.Rejected) as info:
        codec.decode_on(subject, payload)
    assert info.value.reason == reason


def test_validation_limits_are_enforced_at_decode() -> None:
    raw = msgspec.msgpack.encode(
        {"kind": "audio", "session": "s1", "pcm": bytes(ev.MAX_PCM_BYTES + 1), "sample_rate": 16000})
    with pytest.raises(codec.Rejected, match="decode"):
        codec.decode(raw)
    raw = msgspec.msgpack.encode({"kind": "ctl.cancel", "session": "s 1", "turn": 1})
    with pytest.raises(codec.Rejected):
        codec.decode(raw)
    raw = msgspec.msgpack.encode({"kind": "ctl.cancel", "session": "s1", "turn": -1})
    with pytest.raises(codec.Rejected):
        codec.decode(raw)
    raw = msgspec.msgpack.encode({"kind": "ctl.end", "session": "demo\n"})
    with pytest.raises(codec.Rejected):  # a final newline is not part of a session id
        codec.decode(raw)


@pytest.mark.parametrize(
    ("pcm", "rate", "channels", "required", "ok"),
    [
        (640, 16000, 1, 16000, True),
        (882, 22050, 1, None, True),
        (320, 8000, 1, 16000, False),  # a rate other than the one required
        (640, 16000, 2, None, False),  # stereo
        (641, 16000, 1, None, False),  # not 20 ms
        (1764, 44100, 1, None, True),
        (200, 5000, 1, None, False),  # outside 8-48 kHz
    ],
)
def test_frame_problem_names_what_is_wrong(pcm, rate, channels, required, ok) -> None:
    frame = ev.AudioFrame(session="s", pcm=bytes(pcm), sample_rate=rate, channels=channels)
    problem = frame_problem(frame, required)
    assert (problem is None) == ok, problem


MARKS = [ev.WordMark(end_ms=200, text_end=3), ev.WordMark(end_ms=450, text_end=7),
         ev.WordMark(end_ms=800, text_end=13)]  # "one two three"


@pytest.mark.parametrize(("played_ms", "estimate", "heard"), [
    (0, 1, 0),        # nothing finished yet: not even the estimate's first letter
    (199, 2, 0),
    (200, 2, 3),      # a word counts once its end was played
    (600, 10, 7),     # mid-word: only the words that ended
    (800, 12, 13),
    (900, 13, 13),    # past the timed words: the frames' estimate
])
def test_heard_offset_counts_whole_timed_words(played_ms: int, estimate: int, heard: int) -> None:
    assert heard_offset(played_ms, MARKS, estimate) == heard


def test_heard_offset_without_timings_is_the_estimate() -> None:
    assert heard_offset(500, [], 9) == 9


def test_the_shared_vectors_are_what_the_contract_makes_now() -> None:
    """proto/vectors/gateway.json is what another language's implementation (the SIP gateway)
    is tested against: it must be regenerated (python -m proto.vectors) with any change."""
    from proto import vectors

    assert vectors.main(["--check"]) == 0
    kinds = set()
    for vector in json.loads(vectors.FILE.read_text())["vectors"]:
        data = bytes.fromhex(vector["msgpack_hex"])
        if vector["subject"] == sj.SIP_DIAL:
            event = codec.decode_dial(data)
        elif vector["event"]["kind"] == "sip.action.done":  # a reply: no subject of its own
            event = codec.decode(data)
            assert isinstance(event, ev.PhoneActionDone)
        else:
            event = codec.decode_on(vector["subject"], data)
        assert json.loads(msgspec.json.encode(event)) == vector["event"]
        kinds.add((vector["event"]["kind"], vector["event"].get("direction", "")))
    # Both directions of a call, the agent's phone actions and their answers, and the dial
    # request with both kinds of reply.
    assert {("sip.start", ""), ("sip.start", "outbound"), ("llm.phone", ""),
            ("sip.action.done", ""), ("sip.dial", ""), ("sip.dial.reply", "")} <= kinds


def test_a_phone_session_start_is_inbound_unless_it_says_otherwise() -> None:
    old = msgspec.msgpack.encode({"kind": "sip.start", "session": "s1", "caller": "+1555"})
    assert codec.decode_on(sj.CTL_START.subject("s1"), old).direction == "inbound"
    out = ev.PhoneSessionStart(session="s1", direction="outbound")
    assert codec.decode_on(sj.CTL_START.subject("s1"), codec.encode(out)) == out
    with pytest.raises(codec.Rejected):
        codec.decode(msgspec.msgpack.encode({"kind": "sip.start", "session": "s1",
                                             "direction": "sideways"}))


@pytest.mark.parametrize("target", ["+15550100", "15550100", "*21#", "sip:bob@192.0.2.7",
                                    "sips:bob@example.com:5061;transport=tls"])
def test_a_dial_request_takes_a_number_or_a_sip_uri(target: str) -> None:
    request = ev.DialRequest(target=target, greeting="Hi")
    assert codec.decode_dial(codec.encode(request)) == request


@pytest.mark.parametrize(("field", "value"), [
    ("target", ""), ("target", "bob"), ("target", "tel:+1555"), ("target", "+1 555"),
    ("target", "sip:bob@host\r\nVia: x"), ("target", "sip:<bob>"), ("target", "1" * 33),
    ("caller_id", "x\r\nVia: evil"), ("caller_id", "a b"), ("agent", "../etc"),
    ("answer_timeout_ms", 0), ("answer_timeout_ms", 3_600_000),
])
def test_a_dial_request_the_gateway_cannot_use_is_refused(field: str, value: object) -> None:
    fields = {"kind": "sip.dial", "target": "+15550100", field: value}
    with pytest.raises(codec.Rejected):
        codec.decode_dial(msgspec.msgpack.encode(fields))


def test_dial_messages_are_not_session_events() -> None:
    """They travel outside voice.>: neither the session decoder nor a session subject takes
    them, and a session's event is not a dial message."""
    request = codec.encode(ev.DialRequest(target="+15550100"))
    with pytest.raises(codec.Rejected):
        codec.decode(request)
    with pytest.raises(codec.Rejected):
        codec.decode_dial(codec.encode(SAMPLES[0]))
    assert not sj.SIP_DIAL.startswith(sj.PREFIX + ".")


def test_only_the_operator_and_the_gateway_touch_dial_requests() -> None:
    from proto import permissions

    for role in permissions.ROLES:
        rights = permissions.rights(role)
        if rights is None:
            assert role == permissions.OPERATOR  # it may do anything, dialling included
            continue
        publishes = any(_matches(p, sj.SIP_DIAL) for p in rights.publish)
        subscribes = any(_matches(p, sj.SIP_DIAL) for p in rights.subscribe)
        assert not publishes, role  # not the token service, not a stage, not the gateway
        assert subscribes == (role == permissions.SIP), role


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` the rest."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or token not in ("*", have[i]):
            return False
    return len(want) == len(have)


@pytest.mark.parametrize("digit", ["x", "12", "", "#\n"])
def test_a_key_that_is_not_on_a_keypad_is_refused(digit: str) -> None:
    forged = msgspec.msgpack.encode({"kind": "ingress.dtmf", "session": "s1", "digit": digit})
    with pytest.raises(codec.Rejected):
        codec.decode_on(sj.SIP_DTMF.subject("s1"), forged)
    assert codec.decode_on(sj.SIP_DTMF.subject("s1"), msgspec.msgpack.encode(
        {"kind": "ingress.dtmf", "session": "s1", "digit": "*"})).digit == "*"


def test_a_phone_call_at_a_rate_no_phone_has_is_refused() -> None:
    for rate in (0, 4000, 96000):
        forged = msgspec.msgpack.encode({"kind": "sip.start", "session": "s1",
                                         "sample_rate": rate})
        with pytest.raises(codec.Rejected):
            codec.decode_on(sj.CTL_START.subject("s1"), forged)


def test_a_typed_message_is_bounded_and_a_typed_final_keeps_the_old_wire() -> None:
    subject = sj.INGRESS_TEXT.subject("s1")
    for text in ("", "x" * (ev.MAX_CHAT_CHARS + 1)):
        forged = msgspec.msgpack.encode({"kind": "ingress.text", "session": "s1", "text": text})
        with pytest.raises(codec.Rejected):
            codec.decode_on(subject, forged)
    ok = ev.UserText(session="s1", text="x" * ev.MAX_CHAT_CHARS, participant="alice")
    assert codec.decode_on(subject, codec.encode(ok)) == ok
    # ``typed`` is omitted when false: a spoken final is the same bytes as before the field.
    spoken = ev.Transcript(session="s1", turn=1, text="hi", final=True)
    assert b"typed" not in codec.encode(spoken)
    typed = ev.Transcript(session="s1", turn=2, text="hi", final=True, typed=True)
    assert codec.decode_on(sj.STT_FINAL.subject("s1"), codec.encode(typed)).typed
