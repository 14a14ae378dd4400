"""Who may say what on the bus: each role's rights to publish and subscribe, derived from the
contract. nats-server enforces them (``voicebus/auth.py`` writes its configuration;
``docs/security.md`` explains the roles).

A stage publishes only its own subjects (``voice.*.<stage>.*``; egress also speaks for the
judge, ``floor``) and the keys of its own in the KV buckets it needs, and subscribes only to
what it consumes. The token service may only start and end sessions. The session pages read
the capture with a role of their own, ``pages``, which can do nothing else: the token service
holds its key only where the pages are turned on. The operator (``voicebus tap``, record, replay, the launcher, tests)
may do anything: give it to people, not services.

Only the operator may ask the SIP gateway to call someone (``subjects.SIP_DIAL``, ``voicebus
dial``). Not the token service: it faces the internet and mints tokens for whoever asks, and a
right to dial there would let any web visitor make the gateway ring numbers (toll fraud, the
agent's compute and a trunk's money). A service that places calls of its own (a campaign, a
call-back) gets a role of its own with that one right.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto import subjects as sj
from proto import tools

OPERATOR = "operator"
TOKEN = "token"
PAGES = "pages"
SIP = "sip"  # the SIP gateway: starts and ends phone sessions, carries their audio
TOOL = "tool"  # tool services (proto/tools.py): answer calls, say nothing of their own
ROLES = (*sj.STAGES, TOKEN, PAGES, SIP, TOOL, OPERATOR)

LEASES = "voicebus_leases"
SESSIONS = "voicebus_sessions"
HISTORY = "voicebus_history"
# The capture stream (voicebus/record.py).
RECORD = "VOICEBUS_RECORD"

# The topics (or whole producers) a stage listens to in a session it owns, beyond what every
# stage hears (dispatch, session ends, its own handover and ready).
CONSUMES: dict[str, tuple[sj.Topic | str, ...]] = {
    "ingress": (sj.READY["stt"], sj.READY["egress"], sj.EGRESS_PLAYBACK, sj.SIP_AUDIO,
                sj.SIP_DTMF),
    "stt": ("ingress", sj.FLOOR_STATE),
    "llm": ("floor", sj.EGRESS_PLAYBACK),
    "tts": ("llm", sj.FLOOR_CANCEL),
    "egress": ("tts", "stt", "llm", sj.INGRESS_VAD, sj.INGRESS_TRACK, sj.INGRESS_TEXT),
}
# Producers a stage speaks for, beyond its own name.
SPEAKS_FOR = {"egress": ("floor",)}
# The keys a stage writes in the session state bucket: ``<session>.<kind>``.
STATE_KEYS = {"ingress": ("user",), "stt": ("turn",), "egress": ("floor",)}


@dataclass(frozen=True)
class Rights:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def inbox_prefix(role: str) -> str:
    """Replies (requests, JetStream acks, KV watches) come to the role's own inboxes: no role
    can read another's."""
    return f"_INBOX.{role}"


def _listen(item: sj.Topic | str) -> str:
    return item.every_session() if isinstance(item, sj.Topic) else f"{sj.PREFIX}.*.{item}.*"


def _bucket_reads(bucket: str) -> list[str]:
    """Open a bucket (creating it on first use), get keys, watch it."""
    stream = f"KV_{bucket}"
    return [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.CREATE.{stream}",
            f"$JS.API.STREAM.MSG.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>", f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}.>", f"$JS.API.CONSUMER.DELETE.{stream}.>",
            f"$JS.API.CONSUMER.INFO.{stream}.>", f"$JS.FC.{stream}.>"]


def _capture_reads() -> list[str]:
    """Read the capture as ``record.captured`` and ``record.sessions`` do: the stream's info
    (with its subjects' counts) and an ephemeral ordered consumer delivering to the role's own
    inbox, with its flow control. The bare CONSUMER.CREATE subject makes only ephemeral
    consumers; nothing here purges, deletes or changes the stream."""
    return [f"$JS.API.STREAM.INFO.{RECORD}", f"$JS.API.CONSUMER.CREATE.{RECORD}",
            f"$JS.FC.{RECORD}.>"]


def stage_rights(stage: str) -> Rights:
    own = (stage, *SPEAKS_FOR.get(stage, ()))
    publish = [f"{sj.PREFIX}.*.{producer}.*" for producer in own]
    publish += ["$JS.API.INFO", f"$SRV.PING.voicebus-{stage}",
                f"$KV.{LEASES}.{stage}.>",
                f"$KV.{SESSIONS}.*.start",
                *(f"$KV.{SESSIONS}.*.{kind}" for kind in STATE_KEYS.get(stage, ()))]
    publish += _bucket_reads(LEASES) + _bucket_reads(SESSIONS)
    if stage == "llm":
        publish += [f"$KV.{HISTORY}.*", *_bucket_reads(HISTORY),
                    # it calls the tools, and finds them through micro's discovery
                    f"{tools.PREFIX}.>", "$SRV.INFO"]
    subscribe = [_listen(item) for item in CONSUMES[stage]]
    subscribe += [sj.CTL_START.every_session(), sj.CTL_END.every_session(),
                  sj.FLOOR_END.every_session(), sj.HANDOVER[stage].every_session(),
                  sj.READY[stage].every_session(),
                  # nats.micro discovery and our endpoint ($SRV.PING/INFO/STATS…)
                  "$SRV.>", f"voicebus.{stage}.*.sessions",
                  f"{inbox_prefix(stage)}.>"]
    return Rights(tuple(dict.fromkeys(publish)), tuple(dict.fromkeys(subscribe)))


def rights(role: str) -> Rights | None:
    """The role's rights; ``None`` for the operator (everything)."""
    if role == OPERATOR:
        return None
    if role == TOKEN:
        return Rights((sj.CTL_START.every_session(), sj.CTL_END.every_session()),
                      (f"{inbox_prefix(TOKEN)}.>",))
    if role == PAGES:
        return Rights(tuple(_capture_reads()), (f"{inbox_prefix(PAGES)}.>",))
    if role == SIP:
        # The caller's voice in; the agent's voice, and the judge's end of the call, out. It
        # takes dial requests and the agent's phone actions (keys, transfer), and answers them
        # (nats-server's allow_responses).
        return Rights((sj.CTL_START.every_session(), sj.CTL_END.every_session(),
                       f"{sj.PREFIX}.*.{SIP}.*"),
                      (sj.EGRESS_AUDIO.every_session(), sj.FLOOR_END.every_session(),
                       sj.CTL_END.every_session(), sj.LLM_PHONE.every_session(), sj.SIP_DIAL,
                       f"{inbox_prefix(SIP)}.>"))
    if role == TOOL:
        # Calls and discovery in; out only answers to them (allow_responses, voicebus/auth.py).
        return Rights((), (f"{tools.PREFIX}.>", "$SRV.>", f"{inbox_prefix(TOOL)}.>"))
    if role in sj.STAGES:
        return stage_rights(role)
    raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
