"""Event types of the voicebus bus contract (version ``proto.CONTRACT_VERSION``).

Every event is a frozen msgspec Struct tagged with a stable wire name (``kind``). Renaming a
class never changes the wire; new fields get defaults and go last. Data events carry data;
decisions are events of their own (``Verdict``, ``Cancel``, ``UserIdle``, ``SessionEnd``);
measurements ride in one optional ``Timing`` record that nothing but benches and traces reads.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

import msgspec

SESSION_CHARS = r"[A-Za-z0-9_-]{1,64}"
# ``\Z``, not ``$``: Python's ``$`` also matches before a final newline ("demo\n").
SESSION_PATTERN = rf"^{SESSION_CHARS}\Z"
SessionId = Annotated[str, msgspec.Meta(pattern=SESSION_PATTERN)]
# 20 ms of 48 kHz stereo s16le is 3 840 bytes; nothing legitimate is larger than this.
MAX_PCM_BYTES = 8192
Pcm = Annotated[bytes, msgspec.Meta(max_length=MAX_PCM_BYTES)]
Turn = Annotated[int, msgspec.Meta(ge=0)]
Text = Annotated[str, msgspec.Meta(max_length=16384)]
# A whole reply (done events) may be longer than one delta.
LongText = Annotated[str, msgspec.Meta(max_length=262144)]

# Audio on the bus is s16le mono in 20 ms frames; ingress frames are 16 kHz.
FRAME_MS = 20
INGRESS_RATE = 16000


class Timing(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Measurements of the stage that made an event. Only benches and traces read them; no
    stage decides anything on them. Each event fills the fields that apply to it."""

    # The stage's own time for this event: STT final = end of speech → provider final;
    # LLM delta/done = verdict received → this text.
    compute_ms: float = 0.0
    # STT final: how long the final was held back for more speech (the end-of-turn rule).
    hold_ms: int = 0
    # SpeechEnded: when the frame holding the last speech sample was published.
    last_speech_ts_ns: int = 0
    # SynthesisDone: when the first frame went out, the LLM's time until the first spoken
    # chunk's text was complete, and the synthesis time of that chunk.
    first_frame_ts_ns: int = 0
    llm_ms: float = 0.0
    tts_ms: float = 0.0


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="kind"):
    """Base of every bus event.

    ``seq`` is monotonic per producer (the subject's second part) and session; ``ts_ns`` is the
    wall clock at creation, which is how latency across processes is measured.
    """

    session: SessionId
    seq: int = 0
    ts_ns: int = 0


# ---- ingress: the user's audio -------------------------------------------------------------


class AudioFrame(Event, frozen=True, tag="audio"):
    """20 ms of PCM s16le. From ingress: 16 kHz mono. From TTS: the voice's native rate.

    ``pts_ms`` is the audio clock of the first sample. TTS frames carry the ``turn`` they speak
    and ``text_offset``, how many characters of the reply this frame's end has reached.
    """

    pcm: Pcm
    sample_rate: int
    channels: int = 1
    pts_ms: int = 0
    turn: Turn = 0
    text_offset: int = 0
    # From ingress in a room where everyone is heard: whose microphone (the participant's
    # identity); each speaker's frames are a stream, and an audio clock, of their own. Empty:
    # the session's one user.
    speaker: str = ""


class SpeechStarted(Event, frozen=True, tag="vad.start"):
    """The user (``speaker``, as on ``AudioFrame``) started speaking at audio time ``pts_ms``."""

    pts_ms: int
    speaker: str = ""


class SpeechEnded(Event, frozen=True, tag="vad.end"):
    """The user stopped speaking at audio time ``pts_ms`` (end of the last speech audio), after
    ``speech_ms`` of speech."""

    pts_ms: int
    speech_ms: int = 0
    timing: Timing | None = None
    speaker: str = ""


class InputTrack(Event, frozen=True, tag="ingress.track"):
    """The user's microphone as ingress hears it. ``active``: subscribed, frames flow and an STT
    replica listens (the agent is ready to hear the user); false when the track, or the user,
    went away. ``track_sid`` is what transcripts of this user name as their track."""

    participant: str
    track_sid: str = ""
    active: bool = False
    # Set (to ``participant``) in a room where everyone is heard: one of several speakers.
    speaker: str = ""


DTMF_KEYS = "0123456789*#ABCD"
DtmfDigit = Annotated[str, msgspec.Meta(pattern=r"^[0-9*#A-D]\Z")]


class Dtmf(Event, frozen=True, tag="ingress.dtmf"):
    """A key the caller pressed on the phone's keypad (RFC 4733 telephone-event, or LiveKit
    SIP's DTMF packet). From the SIP gateway on ``sip.dtmf``; from ingress, for the session's
    user only, on ``ingress.dtmf``, where the STT makes the keys a turn of their own."""

    digit: DtmfDigit


# What a user may type in one message (LiveKit's ``lk.chat``); ingress refuses longer ones.
MAX_CHAT_CHARS = 2000


class UserText(Event, frozen=True, tag="ingress.text"):
    """A message the session's user typed (a LiveKit text stream on ``lk.chat``), as ingress
    received it from that user alone; the STT makes it a turn of its own. ``participant`` is
    the user's identity (the agent's transcripts go to it)."""

    text: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CHAT_CHARS)]
    participant: str = ""
    # In a room where everyone is heard: the typist as a speaker (``Transcript.speaker``).
    speaker: str = ""


# ---- stt: the user's words -----------------------------------------------------------------


class Transcript(Event, frozen=True, tag="stt.transcript"):
    """What the user said in ``turn``. A final ends the user's turn (opened by the STT, one step
    at a time). ``speech_ms``: how long the user spoke in the turn (the VAD's measure);
    ``frames_dropped``: audio frames of the turn that never arrived.

    ``settled`` (not final): the utterance is over and these are all its words, but the turn
    may still go on for ``timing.hold_ms``: a judge may prepare its answer, never play it, before
    the final. ``continued`` (final): the user spoke again after a settled transcript, so this
    turn ends unanswered and the next one carries its words on (an answer prepared for it is
    dropped). ``typed`` (final): the user typed these words (``UserText``); no speech, so the
    rules for speech over the agent (length, backchannel) do not apply to it."""

    turn: Turn
    text: Text
    final: bool = False
    confidence: float = 0.0
    frames_dropped: int = 0
    provider: str = ""
    speech_ms: int = 0
    timing: Timing | None = None
    settled: bool = False
    continued: bool = False
    typed: bool = False
    # Who said it, in a room where everyone is heard (their identity); empty: the session's
    # one user. A turn is one speaker's: turns are numbered as they start and end in order.
    speaker: str = ""


class UserIdle(Event, frozen=True, tag="stt.idle"):
    """The user said nothing for a while as the agent listened: the STT opens ``turn`` for it.
    ``count`` is how many idle turns in a row (1, 2, …; back to 0 when the user speaks)."""

    turn: Turn
    count: int = 1


# ---- floor: the one judge of turn-taking (in egress) -----------------------------------------

VerdictAction = Literal["answer", "ignore", "greet", "prompt", "goodbye"]
# An ``ignore`` verdict's reason in a meeting where only turns addressed to the agent are
# answered; its ``text`` and ``speaker`` are kept, for the model to see as context.
NOT_ADDRESSED = "not addressed"


class Verdict(Event, frozen=True, tag="floor.verdict"):
    """The judge's decision on ``turn``: ``answer`` the user's ``text``; ``ignore`` it (a
    backchannel, a cough, no words, a turn out of order — ``reason`` says which): no reply;
    or speak a fixed text the agent starts on its own: ``greet`` (turn 0), ``prompt`` or
    ``goodbye`` (a user-idle turn). The LLM answers verdicts; nobody else judges.

    ``draft``: an answer prepared before the turn is certain (from a settled transcript); it is
    confirmed by a verdict of the same turn without ``draft``, or dropped by a ``Cancel``. Until
    confirmed, the reply is not played and the LLM keeps it out of the history."""

    turn: Turn
    action: VerdictAction
    text: Text = ""
    reason: str = ""
    draft: bool = False
    # Who spoke the turn (``Transcript.speaker``): the LLM tells the model who said what.
    speaker: str = ""


class Cancel(Event, frozen=True, tag="ctl.cancel"):
    """The judge's interruption: every stage drops queued and in-flight work of turns <= ``turn``.

    Turn 0 is the greeting; user turns count from 1."""

    turn: Turn
    reason: str = ""


AgentStateName = Literal["initializing", "listening", "thinking", "speaking"]


class AgentState(Event, frozen=True, tag="ctl.state"):
    state: AgentStateName
    turn: Turn = 0


# ---- llm: the agent's words ----------------------------------------------------------------


class ReplyDelta(Event, frozen=True, tag="llm.delta"):
    """A piece of the agent's reply for ``turn``; ``index`` counts the pieces."""

    turn: Turn
    text: Text
    index: int = 0
    timing: Timing | None = None


class ReplyDone(Event, frozen=True, tag="llm.done"):
    """The reply for ``turn`` is complete (or was cut short: ``interrupted``, ``error``).
    Every verdict the LLM answers gets exactly one."""

    turn: Turn
    text: LongText = ""
    interrupted: bool = False
    error: str = ""
    provider: str = ""
    timing: Timing | None = None
    # The model called ``end_call`` in this reply: the judge ends the session once the reply
    # has been heard in full (a reply cut short ends nothing).
    end_call: bool = False


class ToolUse(Event, frozen=True, tag="llm.tool"):
    """The agent called a tool in ``turn`` (docs/tools.md): once when the call starts, and
    again with ``done`` and its ``result`` (JSON text) or ``error``, and how long it took.
    ``call_id`` is the model's id of the call; ``arguments`` the JSON text the model wrote."""

    turn: Turn
    call_id: Annotated[str, msgspec.Meta(max_length=128)]
    name: Annotated[str, msgspec.Meta(max_length=64)]
    arguments: Text = ""
    done: bool = False
    result: Text = ""
    error: Text = ""
    ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0


# ---- tts: the agent's voice ----------------------------------------------------------------


class WordMark(msgspec.Struct, frozen=True, array_like=True):
    """Where a spoken word ends: ``end_ms`` on the turn's ``pts_ms`` clock, ``text_end`` the
    number of characters of the reply up to and including the word."""

    end_ms: Annotated[int, msgspec.Meta(ge=0)]
    text_end: Annotated[int, msgspec.Meta(ge=0)]


class SynthesisDone(Event, frozen=True, tag="tts.done"):
    """All audio of reply ``turn`` has been published (``frames`` of it).

    ``words`` are the word ends the TTS provider timed (Cartesia does), in order; empty when the
    provider gives no timings, and then a frame's ``text_offset`` is a proportional estimate.
    """

    turn: Turn
    frames: int = 0
    text: LongText = ""
    interrupted: bool = False
    words: Annotated[list[WordMark], msgspec.Meta(max_length=65536)] = []
    timing: Timing | None = None


# ---- egress: what the user heard -----------------------------------------------------------


class Playback(Event, frozen=True, tag="egress.playback"):
    """What the user actually heard of ``turn`` so far."""

    turn: Turn
    played_ms: int = 0
    text_offset: int = 0
    final: bool = False
    interrupted: bool = False
    frames_dropped: int = 0
    underruns: int = 0


# ---- ctl: dispatch and the replicas' own protocol --------------------------------------------


class SessionStart(Event, frozen=True, tag="ctl.start"):
    """Dispatch: each stage's queue group hands this to one replica, which owns the session.
    ``greeting``: what the agent says (as turn 0) once it first hears the user; empty for none.
    The same event on ``<stage>.handover`` gives a session to another replica of that stage.
    ``caller``: who called, for a phone call (LiveKit SIP's ``sip.phoneNumber``); else empty.
    ``agent``: the agent profile that answers (docs/tools.md, "Agent profiles"; empty: the
    default one); ``instructions``: more instructions for this session only, after the
    profile's (e.g. the caller's name, from the authorisation hook)."""

    room: str = ""
    greeting: Text = ""
    caller: Text = ""
    agent: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,64}\Z")] = ""
    instructions: Text = ""


class FileSessionStart(SessionStart, frozen=True, tag="dev.start"):
    """Development only: a session whose user is WAV files (``wav_in``, said one after the
    other) and whose agent's voice goes to ``wav_out`` (absolute ``.wav`` paths, below
    ``VOICEBUS_AUDIO_DIR`` when that is set)."""

    wav_in: tuple[str, ...] = ()
    wav_out: str = ""


class PhoneSessionStart(SessionStart, frozen=True, tag="sip.start"):
    """A phone call through voicebus's SIP gateway (docs/telephony.md): no room. The caller's
    voice comes as ``sip.audio`` frames (20 ms of PCM decoded from G.711, at ``sample_rate``),
    continuous for the whole call (silence included, as RTP is); the agent's voice goes out as
    ``egress.audio`` frames at the same rate, paced in real time, for the gateway to encode and
    send. ``room`` stays empty.

    ``direction``: ``inbound`` when the phone called the gateway, ``outbound`` when the gateway
    called it (a ``DialRequest``). ``caller`` is the other party's number or URI either way —
    who called in, or whom the gateway called — as LiveKit SIP's ``sip.phoneNumber`` is for its
    inbound and outbound participants alike."""

    sample_rate: Annotated[int, msgspec.Meta(ge=8000, le=48000)] = 8000
    direction: Literal["inbound", "outbound"] = "inbound"


class SessionEnd(Event, frozen=True, tag="ctl.end"):
    reason: str = ""


class StageReady(Event, frozen=True, tag="ctl.ready"):
    """A replica of ``stage`` has claimed the session and subscribed to its inputs."""

    stage: str
    replica: str


class PhoneAction(Event, frozen=True, tag="llm.phone"):
    """The agent acts on its phone call (the built-in tools ``send_dtmf`` and ``transfer``,
    docs/tools.md), as a request to the SIP gateway on ``llm.phone``: ``dtmf`` sends ``digits``
    to the other party as RFC 4733 keys; ``transfer`` hands the call to ``target`` (a number
    or a SIP URI) with a SIP REFER and hangs up once the other party took it. ``call_id`` is
    the tool call's. The gateway answers with a ``PhoneActionDone`` (the NATS reply)."""

    turn: Turn
    call_id: Annotated[str, msgspec.Meta(max_length=128)]
    action: Literal["dtmf", "transfer"]
    digits: Annotated[str, msgspec.Meta(pattern=r"^[0-9*#A-D]{0,32}\Z")] = ""
    target: Annotated[str, msgspec.Meta(pattern=r"^(|\+?[0-9*#]{1,32}|sips?:[^\s<>\"]{1,250})\Z")] = ""


class PhoneActionDone(Event, frozen=True, tag="sip.action.done"):
    """The gateway's answer to a ``PhoneAction``: done, or ``error`` in words (no such call
    here, the keys could not be sent, the transfer was refused: the REFER's status)."""

    call_id: Annotated[str, msgspec.Meta(max_length=128)]
    error: Text = ""


class StageError(Event, frozen=True, tag="ctl.error"):
    """A stage could not do its work for ``turn`` (every provider failed, bad config…)."""

    stage: str
    turn: Turn = 0
    message: str = ""
    retryable: bool = False


# ---- requests to a service (not a session's events) -----------------------------------------

# A number (digits, an optional leading +, the keypad's * and #) or a SIP URI.
DIAL_TARGET_PATTERN = r"^(\+?[0-9*#]{1,32}|sips?:[^\s<>\"]{1,250})\Z"
DialTarget = Annotated[str, msgspec.Meta(pattern=DIAL_TARGET_PATTERN)]
# What the callee sees as the caller: a number or a SIP user part, nothing that could break the
# From header.
CallerId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9+*#._-]{0,64}\Z")]
DialError = Literal["", "bad_request", "busy", "declined", "no_answer", "refused", "unreachable",
                    "failed"]


class DialRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True,
                  tag_field="kind", tag="sip.dial"):
    """Ask the SIP gateway to call ``target`` (request/reply on ``subjects.SIP_DIAL``; one
    replica takes it, queue group ``subjects.SIP_DIAL_QUEUE``). A number goes through the
    gateway's trunk (``VOICEBUS_SIP_DIAL_TRUNK``), a ``sip:`` URI straight to its host.
    ``caller_id``: the From user the callee sees (empty: the gateway's own). ``greeting``: what
    the agent says once the callee picks up (the session's turn 0). ``agent`` and
    ``instructions``: the agent profile that talks and this call's own instructions, passed on
    as the session start's (``SessionStart``). ``answer_timeout_ms``: how long it may ring. The
    reply comes once the callee answered (the session has started) or did not."""

    target: DialTarget
    caller_id: CallerId = ""
    greeting: Text = ""
    agent: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,64}\Z")] = ""
    instructions: Text = ""
    answer_timeout_ms: Annotated[int, msgspec.Meta(ge=1000, le=120_000)] = 30_000


class DialReply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True,
                tag_field="kind", tag="sip.dial.reply"):
    """The gateway's answer to a ``DialRequest``: the ``session`` it started (its
    ``PhoneSessionStart`` has ``direction="outbound"``), or an ``error``: ``busy`` (486, 600),
    ``declined`` (603), ``no_answer`` (rang out, 408, 480), ``refused`` (any other final
    failure), ``unreachable`` (no answer at all from the target), ``bad_request`` (a target or
    caller id the gateway cannot use, a number without a trunk), ``failed`` (the gateway's own
    trouble). ``status`` is the callee's SIP status when it sent one; ``reason`` says more, for
    people."""

    session: SessionId = ""
    error: DialError = ""
    status: Annotated[int, msgspec.Meta(ge=0, le=699)] = 0
    reason: Text = ""


# ---- usage: what the providers did, per turn ---------------------------------------------------


class Usage(Event, frozen=True, tag="usage"):
    """What one provider of ``stage`` did for ``turn``, in the units vendors bill, published by
    that stage on ``<stage>.usage`` once the turn's work there is over (finished, cut or
    failed): one event per provider that worked on the turn, so a fallback chain gives one for
    the provider that failed (``failed``; what it consumed before failing counts) and one for
    the provider that answered. ``interrupted``: the turn was cut (barge-in, a newer turn);
    the counts are what went to the provider until then.

    ``requests``: times the stage asked the provider (a completion per tool round, a stream per
    utterance or reply). LLM: the tokens the API reported, ``input_tokens`` including the
    ``cached_tokens`` read from its prompt cache; none when it reported nothing (a reply cut
    before its end, a failure). TTS: ``characters`` of text given to the provider and
    ``audio_out_s`` it made. STT: ``audio_in_s`` of audio sent to it. ``cost_usd`` from the
    deployment's price table (``VOICEBUS_PRICES``, docs/providers.md); ``None`` when the table
    has no price for this provider or a priced unit went unreported.

    ``seq`` counts usage events on their own: a reading of the meter is not part of the stage's
    stream, so consumers counting gaps in that stream (``SeqGaps``) see no hole."""

    stage: str = ""
    provider: str = ""
    turn: Turn = 0
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    characters: int = 0
    audio_in_s: float = 0.0
    audio_out_s: float = 0.0
    failed: bool = False
    interrupted: bool = False
    cost_usd: float | None = None


AnyEvent = (
    AudioFrame
    | SpeechStarted
    | SpeechEnded
    | InputTrack
    | Dtmf
    | UserText
    | Transcript
    | UserIdle
    | Verdict
    | Cancel
    | AgentState
    | ReplyDelta
    | ReplyDone
    | ToolUse
    | PhoneAction
    | PhoneActionDone
    | SynthesisDone
    | Playback
    | SessionStart
    | FileSessionStart
    | PhoneSessionStart
    | SessionEnd
    | StageReady
    | StageError
    | Usage
)


def now_ns() -> int:
    return time.time_ns()
