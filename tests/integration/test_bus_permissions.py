"""The bus refuses whoever has no right: a real nats-server with the configuration `voicebus up`
generates (voicebus/auth.py). Nobody connects anonymously; each role may publish only its own
subjects and subscribe only to what it consumes; the session history is the LLM's alone.

The expectations here are written out by hand, from the contract's table of producers, not
computed from proto/permissions.py: a wrong right there fails here."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.errors import Error as NatsError

from proto import codec
from proto import events as ev
from proto.permissions import ROLES, inbox_prefix
from tests.conftest import LogTail
from voicebus import record
from voicebus.launcher import Stack, make_certificates

pytestmark = pytest.mark.asyncio(loop_scope="module")

S = "victim"
# A refused request is never answered: it fails by timing out, after this long. (That it was
# refused is the server's word, which Client.refused waits for; a request let through would
# be answered, and fail the test, well within it.)
UNANSWERED_S = 0.5
# Who may publish each topic of a session: its producer (the judge speaks from egress; the
# token service and the SIP gateway dispatch), and the operator.
PUBLISHERS = {
    "ingress.audio": ("ingress",), "ingress.vad": ("ingress",), "ingress.track": ("ingress",),
    "ingress.dtmf": ("ingress",), "sip.dtmf": ("sip",),
    "stt.partial": ("stt",), "stt.final": ("stt",), "stt.idle": ("stt",),
    "llm.delta": ("llm",), "llm.done": ("llm",), "tts.audio": ("tts",), "tts.done": ("tts",),
    "egress.playback": ("egress",), "egress.audio": ("egress",),
    "floor.verdict": ("egress",), "floor.cancel": ("egress",),
    "floor.state": ("egress",), "floor.end": ("egress",),
    "ctl.start": ("token", "sip"), "ctl.end": ("token", "sip"), "sip.audio": ("sip",),
    "stt.ready": ("stt",), "tts.handover": ("tts",), "egress.error": ("egress",),
}


class Client:
    """A connection as one role that remembers the permission violations the server reports."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.violations: list[str] = []
        self.changed = asyncio.Event()
        self.nc: nats.NATS | None = None

    async def connect(self, stack: Stack) -> Client:
        async def on_error(exc: Exception) -> None:
            if "permissions violation" in str(exc).lower():
                self.violations.append(str(exc).lower())
                self.changed.set()

        self.nc = await stack.connect(self.role, error_cb=on_error)
        return self

    async def refused(self, subject: str, timeout: float = 10.0) -> bool:
        """Wait for the server's word that ``subject`` was refused to us."""
        # (nats-py lowercases the server's message)
        wanted = f'"{subject.lower()}"'

        async def seen() -> None:
            while True:
                self.changed.clear()  # before looking: a refusal from now on sets it again
                if any(wanted in v for v in self.violations):
                    return
                await self.changed.wait()

        try:
            await asyncio.wait_for(seen(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.role}: no refusal of {subject}; refused so far: "
                                 f"{self.violations}") from None
        return True


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def bus(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("perm")
    logs = LogTail(tmp / "stack.log")
    stack = Stack(tmp, sink=logs)
    await stack.start(stages=())
    clients = {role: await Client(role).connect(stack) for role in ROLES}
    yield stack, clients
    for client in clients.values():
        assert client.nc is not None
        await client.nc.close()
    await stack.stop()


async def test_nobody_connects_without_credentials(bus) -> None:
    stack, _ = bus
    with pytest.raises(NatsError, match="[Aa]uthorization"):
        await nats.connect(stack.nats_url, allow_reconnect=False, max_reconnect_attempts=0,
                           connect_timeout=2, error_cb=_ignore)
    # A well-formed key the server does not know is no better than none.
    from voicebus import auth
    stranger = stack.workdir / "stranger.nk"
    stranger.write_bytes(auth.new_seed())
    with pytest.raises(NatsError, match="[Aa]uthorization"):
        await nats.connect(stack.nats_url, nkeys_seed=str(stranger), allow_reconnect=False,
                           max_reconnect_attempts=0, connect_timeout=2, error_cb=_ignore)


async def _ignore(_exc: Exception) -> None:
    return None


async def test_each_role_publishes_its_own_subjects_and_no_other(bus) -> None:
    """Every role publishes on every topic of a session; the operator, listening to all, must
    receive exactly the allowed ones, and the server must refuse each of the others."""
    stack, clients = bus
    operator = clients["operator"].nc
    assert operator is not None
    received: set[tuple[str, str]] = set()
    arrived = asyncio.Event()

    async def on_msg(msg) -> None:
        received.add((msg.headers["role"], msg.subject))
        arrived.set()

    await operator.subscribe("voice.>", cb=on_msg)
    await operator.flush()
    for role, client in clients.items():
        assert client.nc is not None
        for topic in PUBLISHERS:
            await client.nc.publish(f"voice.{S}.{topic}", b"forged", headers={"role": role})
        await client.nc.flush()

    allowed = {(role, f"voice.{S}.{topic}") for role in clients
               for topic, producers in PUBLISHERS.items() if role in (*producers, "operator")}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            while not allowed <= received:
                arrived.clear()
                await arrived.wait()
    assert allowed <= received, f"allowed but not delivered: {sorted(allowed - received)}"
    for role, client in clients.items():
        for topic in PUBLISHERS:
            if (role, subject := f"voice.{S}.{topic}") not in allowed:
                assert await client.refused(subject), (role, subject)
    # Nothing refused got through.
    assert {(r, s) for r, s in received
            if r not in (*PUBLISHERS[s.split(".", 2)[2]], "operator")} == set()


@pytest.mark.parametrize("role", ["ingress", "stt", "llm", "tts", "egress", "token", "sip"])
async def test_no_service_reads_the_whole_bus(bus, role) -> None:
    _, clients = bus
    client = clients[role]
    assert client.nc is not None
    await client.nc.subscribe("voice.>")
    await client.nc.subscribe(f"voice.{S}.>")
    await client.nc.subscribe(f"{inbox_prefix('operator')}.>")  # another role's replies
    await client.nc.flush()
    for subject in ("voice.>", f"voice.{S}.>", f"{inbox_prefix('operator')}.>"):
        assert await client.refused(subject)


# What each stage must hear, and something it has no business hearing.
HEARS = {
    "ingress": ("voice.*.egress.playback", "voice.*.stt.final"),
    "stt": ("voice.*.ingress.audio", "voice.*.llm.delta"),
    "llm": ("voice.*.floor.verdict", "voice.*.ingress.audio"),
    "tts": ("voice.*.llm.delta", "voice.*.stt.final"),
    "egress": ("voice.*.tts.audio", "voice.*.ingress.audio"),
    "token": ("_INBOX.token.x", "voice.*.stt.final"),
}


@pytest.mark.parametrize("role", sorted(HEARS))
async def test_each_role_subscribes_to_what_it_consumes_and_nothing_else(bus, role) -> None:
    stack, clients = bus
    client = clients[role]
    assert client.nc is not None
    allowed, forbidden = HEARS[role]
    got = asyncio.Event()

    async def on_msg(_msg) -> None:
        got.set()

    await client.nc.subscribe(allowed, cb=on_msg)
    await client.nc.subscribe(forbidden)
    await client.nc.flush()
    assert await client.refused(forbidden)
    # The allowed one really is live: a message published there arrives.
    operator = clients["operator"].nc
    assert operator is not None
    await operator.publish(allowed.replace("*", S), b"x")
    await asyncio.wait_for(got.wait(), 10)
    assert not any(f'"{allowed}"' in v for v in client.violations)


async def test_the_history_is_the_llms_alone_and_a_stage_writes_only_its_own_lease(bus) -> None:
    _, clients = bus
    llm = clients["llm"].nc
    assert llm is not None
    history = await llm.jetstream().create_key_value(bucket="voicebus_history")
    await history.put(S, b"what the user said")
    for role in ("ingress", "stt", "tts", "egress", "token"):
        client = clients[role]
        assert client.nc is not None
        with pytest.raises((NatsError, asyncio.TimeoutError)):
            await client.nc.jetstream(timeout=UNANSWERED_S).key_value("voicebus_history")
        assert await client.refused("$JS.API.STREAM.INFO.KV_voicebus_history")
    leases = await llm.jetstream().create_key_value(bucket="voicebus_leases")
    await leases.put(f"llm.{S}", b"llm")  # its own
    stt = clients["stt"]
    assert stt.nc is not None
    js = stt.nc.jetstream(timeout=UNANSWERED_S)
    with pytest.raises((NatsError, asyncio.TimeoutError)):
        await js.publish(f"$KV.voicebus_leases.llm.{S}", b"stt")
    assert await stt.refused(f"$KV.voicebus_leases.llm.{S}")
    assert (await leases.get(f"llm.{S}")).value == b"llm"


async def test_the_session_pages_read_the_capture_and_cannot_delete_from_it(bus) -> None:
    """The session pages read the capture as the role "pages": every message of a session, in
    order, and the list of sessions. Purging the stream, deleting a message or the stream is
    refused by the server; neither the token role nor a stage can read the capture at all."""
    _, clients = bus
    operator, pages, token, stt = (clients[role].nc for role in
                                   ("operator", "pages", "token", "stt"))
    assert operator is not None and pages is not None and token is not None and stt is not None
    kept = "kept"
    said = [(f"voice.{kept}.ingress.vad", ev.SpeechStarted(session=kept, seq=1, ts_ns=1, pts_ms=0)),
            (f"voice.{kept}.stt.final", ev.Transcript(session=kept, seq=1, ts_ns=2, turn=1,
                                                      text="my secret", final=True))]
    acks = [await operator.jetstream().publish(subject, codec.encode(event))
            for subject, event in said]  # stored once acknowledged
    assert {ack.stream for ack in acks} == {"VOICEBUS_RECORD"}

    entries = await record.captured(pages.jetstream(), kept)
    assert [(e.subject, codec.decode_on(e.subject, e.data)) for e in entries] == said
    assert (await record.sessions(pages.jetstream()))[kept] == 2

    js = pages.jetstream(timeout=UNANSWERED_S)
    attempts = {"STREAM.PURGE": lambda: js.purge_stream("VOICEBUS_RECORD",
                                                         subject=f"voice.{kept}.>"),
                # (nats-py's delete_msg waits 5 s whatever the context's timeout)
                "STREAM.MSG.DELETE": lambda: asyncio.wait_for(
                    js.delete_msg("VOICEBUS_RECORD", acks[1].seq), UNANSWERED_S),
                "STREAM.DELETE": lambda: js.delete_stream("VOICEBUS_RECORD")}
    for api, attempt in attempts.items():
        with pytest.raises((NatsError, asyncio.TimeoutError)):
            await attempt()
        assert await clients["pages"].refused(f"$JS.API.{api}.VOICEBUS_RECORD")
    assert len(await record.captured(operator.jetstream(), kept)) == 2  # all still there

    for role, nc in (("token", token), ("stt", stt)):
        with pytest.raises((NatsError, asyncio.TimeoutError)):
            await record.captured(nc.jetstream(timeout=UNANSWERED_S), kept)
        assert await clients[role].refused("$JS.API.STREAM.INFO.VOICEBUS_RECORD")


async def test_the_bus_can_require_tls(tmp_path) -> None:
    """nats-server with a tls block: a stage configured with the CA (VOICEBUS_NATS_TLS_CA)
    connects and serves; a client that does not trust the CA is refused."""
    certs = make_certificates(tmp_path, "server")
    logs = LogTail(tmp_path / "stack.log")
    stack = Stack(tmp_path, sink=logs, nats_tls_ca=Path(certs["ca.pem"]),
                  nats_tls={"cert_file": certs["server.pem"], "key_file": certs["server.key"]})
    await stack.start(stages=("llm",))  # ready: it answered discovery over TLS
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            await nats.connect(stack.nats_url, nkeys_seed=str(stack.seed_file("operator")),
                               tls=ssl.create_default_context(),  # the system's CAs only
                               allow_reconnect=False, max_reconnect_attempts=0,
                               connect_timeout=2, error_cb=_ignore)
        nc = await stack.connect()  # trusting the CA
        assert nc.connected_url is not None and nc.client_id
        await nc.close()
    finally:
        codes = await stack.stop()
    assert codes["llm"] == 0, logs.dump()
