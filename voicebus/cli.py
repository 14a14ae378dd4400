"""The ``voicebus`` command: run the stack, talk to it, watch it, measure it."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

import nats

from proto import events as ev
from proto.permissions import OPERATOR, inbox_prefix
from proto import subjects as sj
from services.runtime import bus
from services.runtime.config import nats_servers
from services.runtime.livekit import exit_process
from voicebus.client import Tap, dispatch, end_session, timing

DEFAULT_QUESTION = "What time is it?"


def _describe(event: ev.Event) -> str | None:
    """One human line for the events worth showing in a terminal (never audio frames)."""
    match event:
        case ev.Transcript(final=False, text=text) if text:
            return f"  you (partial): {text}"
        case ev.Transcript(final=True, text=text, turn=turn):
            return f"  you  [turn {turn}]: {text or '(nothing recognised)'}"
        case ev.ReplyDone(text=text, turn=turn, error=error):
            return f"  agent[turn {turn}]: {text or '(no reply)'}" + (f"  error: {error}" if error else "")
        case ev.Playback(final=True, turn=turn, played_ms=ms, interrupted=cut):
            return f"  played turn {turn}: {ms} ms{' (interrupted)' if cut else ''}"
        case ev.StageError(stage=stage, message=message):
            return f"  ERROR from {stage}: {message}"
    return None


async def connect_operator(args: argparse.Namespace) -> nats.NATS:
    """The bus as the operator (``--nkey``, else ``VOICEBUS_NATS_NKEY_FILE``): nothing connects
    anonymously. ``voicebus up`` prints where its operator's seed is."""
    seed = args.nkey or os.environ.get("VOICEBUS_NATS_NKEY_FILE", "")
    async def quiet(_exc: Exception) -> None:  # the failure is reported below, once
        return None

    # A tool fails fast: nats-py retries even a first connection (by default 60 times, 2 s
    # apart, so a command against the wrong port sat silent for two minutes). Now: a refused
    # port in ~3 s; an address that never answers, ~11 s a node.
    options: dict[str, Any] = {"inbox_prefix": inbox_prefix(OPERATOR), "allow_reconnect": False,
                               "error_cb": quiet, "max_reconnect_attempts": 3,
                               "reconnect_time_wait": 1, "connect_timeout": 2}
    if seed:
        options["nkeys_seed"] = seed
    try:
        return await bus.connect(nats_servers(args.nats), **options)
    except Exception as exc:
        hint = "" if seed else " (no credentials given: --nkey FILE, as `voicebus up` prints)"
        raise SystemExit(f"voicebus: cannot connect to {args.nats}: {exc or type(exc).__name__}"
                         f"{hint}") from None


async def converse(args: argparse.Namespace, timeout: float = 120.0) -> int:
    """Dispatch one session that says ``--wav`` files in turn; print what happens; record the
    reply in ``--out``."""
    wavs, out = args.wav, args.out
    session = f"cli-{secrets.token_hex(4)}"
    nc = await connect_operator(args)
    tap = Tap(nc)
    tap.on_event = lambda _s, e: (line := _describe(e)) and print(line, flush=True)
    await tap.watch(sj.session_all(session))
    try:
        await dispatch(nc, tap, session, wav_in=[str(p.resolve()) for p in wavs],
                       wav_out=str(out.resolve()))
        print(f"session {session}: speaking {len(wavs)} file(s)", flush=True)
        await tap.wait_for(lambda: len(tap.of(ev.Playback, session, final=True)) >= len(wavs),
                           timeout, "the agent's replies")
        for done in tap.of(ev.SynthesisDone, session):
            ended = tap.of(ev.SpeechEnded, session)
            if ended and timing(done).first_frame_ts_ns:
                v2v = (timing(done).first_frame_ts_ns - timing(ended[0]).last_speech_ts_ns) / 1e6
                print(f"  turn {done.turn}: first reply audio {v2v:.0f} ms after your last word")
                break
        print(f"reply audio written to {out}")
        return 0
    except TimeoutError as exc:
        print(f"voicebus: {exc}", file=sys.stderr)
        return 1
    finally:
        await end_session(nc, session)
        await tap.close()
        await nc.close()


async def cmd_up(args: argparse.Namespace) -> int:
    from voicebus.launcher import PortTaken, Stack, offline_ear

    workdir = Path(tempfile.mkdtemp(prefix="voicebus-"))
    stack = Stack(workdir, nats_port=args.nats_port, nats_cluster=args.nats_cluster,
                  livekit=True, livekit_nodes=args.livekit_nodes, livekit_redis=args.redis,
                  sip=args.sip_port >= 0, sip_port=max(0, args.sip_port),
                  livekit_port=args.livekit_port, token_port=args.port, env=offline_ear(),
                  audio_dir=args.audio_dir.resolve() if args.audio_dir else None,
                  # The demo agent's tools: offline and harmless (services/tools/demo.py).
                  tools=("demo",))
    # A process manager's SIGTERM, a closed terminal's SIGHUP and Ctrl-C all stop the stack the
    # same way (a SIGKILL too: every child is bound to die with this process).
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    operator = None
    try:
        try:
            await stack.start()
        except PortTaken as exc:
            print(f"voicebus up: {exc}", file=sys.stderr)
            return 1
        operator = await stack.connect()  # answers `voicebus redeploy`
        await stack.serve_operator(operator)
        me = Path(sys.argv[0]).name
        print(f"\nvoicebus is up — open {stack.token_url}/ and talk to the agent.\n"
              f"  or from a terminal: {me} call --token-url {stack.token_url} "
              f"--say {DEFAULT_QUESTION!r}\n"
              f"  watch the bus:      {me} tap --nats {stack.nats_url} "
              f"--nkey {stack.seed_file(OPERATOR)}\n"
              f"  past sessions:      {stack.token_url}/sessions\n"
              + (f"  or from a SIP phone: sip:agent@127.0.0.1:{stack.sip_port} (UDP or TCP, "
                 "PCMU/PCMA)\n" if stack.sip else "") +
              "Ctrl-C stops everything.\n", flush=True)
        code = 0
        if args.say or args.wav or args.text:
            args.token_url, args.room, args.identity, args.timeout = \
                stack.token_url, f"demo-{secrets.token_hex(3)}", "demo-user", 60.0
            code = await cmd_call(args)
        if not args.once:
            await stopping.wait()
        return code
    finally:
        if operator is not None:
            await operator.close()
        codes = await stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # its livekit.yaml holds the API secret
        print(f"stopped: {codes}")


async def cmd_redeploy(args: argparse.Namespace) -> int:
    """Ask a running `voicebus up` to replace every replica of a stage, one at a time."""
    from voicebus.launcher import OPERATOR_REDEPLOY

    nc = await connect_operator(args)
    try:
        msg = await nc.request(OPERATOR_REDEPLOY, args.stage.encode(), timeout=args.timeout)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        print(f"voicebus redeploy: no voicebus up answered on {args.nats}", file=sys.stderr)
        return 1
    finally:
        await nc.close()
    reply = json.loads(msg.data)
    print(json.dumps(reply, indent=2))
    return 1 if "error" in reply else 0


async def cmd_call(args: argparse.Namespace) -> int:
    from services.ingress.audio import SAMPLE_RATE, AudioFormatError, Resampler, read_wav
    from voicebus.call import CallError, call
    from voicebus.speech import say_to_wav

    def mono16k(path: Path) -> tuple[bytes, int]:
        pcm, rate, channels = read_wav(path)
        resampler = Resampler(rate, channels)
        return resampler.process(pcm) + resampler.flush(), SAMPLE_RATE

    try:
        utterances = [mono16k(path) for path in args.wav or []]
    except (AudioFormatError, OSError) as exc:
        print(f"voicebus call: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        for index, text in enumerate(args.say or []):
            wav = await say_to_wav(text, Path(tmp) / f"say{index}.wav", lead_ms=0)
            utterances.append(mono16k(wav))
    texts = tuple(args.text or ())
    if not utterances and not texts:
        print("voicebus call: give --wav FILE, --say TEXT or --text TEXT", file=sys.stderr)
        return 2
    try:
        await call(args.token_url, args.room, utterances, args.out, identity=args.identity,
                   timeout=args.timeout, agent=args.agent, texts=texts)
    except (CallError, OSError, TimeoutError) as exc:
        print(f"voicebus call: {exc}", file=sys.stderr)
        return 1
    return 0


async def cmd_tap(args: argparse.Namespace) -> int:
    nc = await connect_operator(args)
    tap = Tap(nc)
    tap.on_event = lambda subject, e: (
        None if isinstance(e, ev.AudioFrame) and not args.audio else print(subject, e, flush=True))
    await tap.watch(sj.session_all(args.session) if args.session else sj.everything())
    await asyncio.Event().wait()
    return 0


async def cmd_dial(args: argparse.Namespace) -> int:
    """Ask the SIP gateway to call someone (voicebus/dial.py); print its answer as JSON: the
    session it started, or why the call did not go through (exit status 1)."""
    from voicebus.dial import DialError, dial, render, request

    try:
        dialled = request(args.target, greeting=args.greeting, caller_id=args.caller_id,
                          agent=args.agent, instructions=args.instructions,
                          answer_timeout_s=args.ring_timeout)
    except DialError as exc:
        print(f"voicebus dial: {exc}", file=sys.stderr)
        return 2
    nc = await connect_operator(args)
    try:
        reply = await dial(nc, dialled)
    except DialError as exc:
        print(f"voicebus dial: {exc}", file=sys.stderr)
        return 2
    finally:
        await nc.close()
    print(render(reply), flush=True)
    return 1 if reply.error else 0


async def cmd_sip_setup(args: argparse.Namespace) -> int:
    """The inbound trunk and dispatch rule LiveKit SIP needs to send phone calls to the agent
    (voicebus/sip.py). Keys from LiveKit's own variables, never from the command line."""
    from livekit import api

    from voicebus.sip import SipSetup, SipSetupError, apply

    setup = SipSetup(name=args.name, numbers=tuple(args.number),
                     allowed_addresses=tuple(args.allowed_address),
                     auth_username=args.auth_username,
                     auth_password=os.environ.get("VOICEBUS_SIP_AUTH_PASSWORD", ""),
                     room_prefix=args.room_prefix)
    key, secret = os.environ.get("LIVEKIT_API_KEY", ""), os.environ.get("LIVEKIT_API_SECRET", "")
    if not (key and secret):
        print("voicebus sip setup: set LIVEKIT_API_KEY and LIVEKIT_API_SECRET", file=sys.stderr)
        return 2
    url = args.livekit_url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
    lkapi = api.LiveKitAPI(url, key, secret)
    try:
        result = await apply(lkapi, setup)
    except SipSetupError as exc:
        print(f"voicebus sip setup: {exc}", file=sys.stderr)
        return 2
    except api.TwirpError as exc:  # e.g. "sip not connected (redis required)"
        print(f"voicebus sip setup: livekit-server refused: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await lkapi.aclose()
    print(json.dumps(result))
    return 0


async def cmd_credentials(args: argparse.Namespace) -> int:
    """New bus credentials for a deployment: nats.conf (public keys and rights) and a seed per
    role, to keep as secrets (docs/security.md)."""
    from voicebus import auth

    if (args.folder / "nats.conf").exists() and not args.force:
        print(f"voicebus credentials: {args.folder} holds credentials already (--force replaces "
              "them; every service then needs its new seed)", file=sys.stderr)
        return 1
    seeds = auth.generate(args.folder)
    print(f"{args.folder / 'nats.conf'}: nats-server's users and their rights")
    for role, path in seeds.items():
        print(f"{path}: the {role} seed (a secret: give it to that role only)")
    return 0


async def cmd_record(args: argparse.Namespace) -> int:
    """The capture of a running stack: set it up, list, export, import, purge."""
    from voicebus import record

    async def work(nc: Any) -> int:
        js = nc.jetstream()
        if args.action == "setup":
            print(await record.setup(js, record.CaptureSettings.from_env()))
        elif args.action == "list":
            for session, count in sorted((await record.sessions(js)).items()):
                print(f"{session}\t{count} messages")
            for session in await record.imported(js):
                print(f"{session}\timported")
        elif args.action == "export":
            recording = await record.export(js, args.session)
            out = args.out or Path(f"{args.session}.vbus")
            out.write_bytes(record.dumps(recording))
            print(f"{out}: {recording.header.count} messages of {args.session}")
        elif args.action == "audio":
            recording = await record.export(js, args.session)
            out = args.out or Path(f"{args.session}.wav")
            record.write_wav(out, record.conversation_audio(recording), mix=args.mix)
            channels = "mixed" if args.mix else "user left, agent right"
            print(f"{out}: the call as heard ({channels})")
        elif args.action == "usage":
            from voicebus import timeline

            recording = await record.export(js, args.session)
            print("\n".join(timeline.usage_report(args.session, recording.entries)))
        elif args.action == "import":
            print(f"imported {await record.import_file(js, record.read_file(args.file))}")
        elif args.action == "purge":
            print(f"purged {await record.purge(js, args.session)} messages of {args.session}")
        return 0

    return await _on_bus(args, "record", work)


async def cmd_replay(args: argparse.Namespace) -> int:
    from voicebus import record, replay

    async def work(nc: Any) -> int:
        recording = record.read_file(args.file)
        done = await replay.replay(nc, recording, args.into, session=args.as_session,
                                   speed=0.0 if args.speed == "max" else float(args.speed))
        for wait in done.waits:
            print(f"note: {wait}", file=sys.stderr)
        code = await _print_diff(nc, recording, done.session, args.json) if args.diff else 0
        print(done.session)
        return code

    return await _on_bus(args, "replay", work)


async def cmd_diff(args: argparse.Namespace) -> int:
    from voicebus import record

    return await _on_bus(args, "diff", lambda nc: _print_diff(
        nc, record.read_file(args.file), args.session, args.json))


async def _on_bus(args: argparse.Namespace, command: str,
                  work: Callable[[Any], Awaitable[int]]) -> int:
    """Run ``work`` on the bus as the operator; a bad recording, session or replay is one line
    on stderr and exit status 2."""
    from voicebus import record, replay

    nc = await connect_operator(args)
    try:
        return await work(nc)
    except (record.RecordingError, replay.ReplayError, sj.BadSubject, TimeoutError) as exc:
        print(f"voicebus {command}: {exc}", file=sys.stderr)
        return 2
    finally:
        await nc.close()


async def _print_diff(nc: Any, recording: Any, session: str, as_json: bool) -> int:
    """Like diff(1): 0 when nothing changed, 1 when something did."""
    from voicebus import record, replay

    result = replay.diff(recording, await record.export(nc.jetstream(), session))
    print(json.dumps(result) if as_json else replay.render(result), flush=True)
    return 1 if result["changed"] else 0


async def cmd_say(args: argparse.Namespace) -> int:
    from voicebus.speech import say_to_wav

    await say_to_wav(args.text, args.out, tail_ms=500)
    print(args.out)
    return 0


async def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "livekit":
        from voicebus.bench.livekit import run_livekit_bench

        result = await run_livekit_bench(turns=args.turns)
    elif args.bench == "barge-in":
        from voicebus.bench.bargein import run_bargein_bench

        result = await run_bargein_bench(trials=args.trials, seed=args.seed)
    elif args.bench == "stt":
        from voicebus.bench.stt import run_stt_bench

        try:
            result = await run_stt_bench(args.providers.split(","), pace=args.pace,
                                         voices=args.voices, phrases=args.phrases)
        except RuntimeError as exc:
            print(f"voicebus bench stt: {exc}", file=sys.stderr)
            return 2
    elif args.bench == "turns":
        from voicebus.bench.turns import run_turns_bench

        try:
            result = await run_turns_bench(
                args.provider, [int(ms) for ms in args.silence_ms.split(",") if ms],
                [int(ms) for ms in args.statement_ms.split(",") if ms], voices=args.voices,
                phrases=args.phrases, pause_ms=args.pause_ms, smart_turn=args.smart_turn)
        except RuntimeError as exc:
            print(f"voicebus bench turns: {exc}", file=sys.stderr)
            return 2
    elif args.bench == "sip":
        from voicebus.bench.sip import run_sip_bench

        result = await run_sip_bench(calls=args.calls, turns=args.turns,
                                     providers=args.providers, spread_s=args.spread,
                                     gap_s=args.gap, timeout_s=args.timeout)
    elif args.bench == "chaos":
        from voicebus.bench.chaos import run_chaos_bench

        try:
            result = await run_chaos_bench(calls=args.calls, kills=args.kills, stage=args.stage,
                                           sig=args.signal, turns=args.turns, seed=args.seed,
                                           nats_cluster=args.nats_cluster)
        except ValueError as exc:
            print(f"voicebus bench chaos: {exc}", file=sys.stderr)
            return 2
    else:
        from voicebus.bench.pipeline import run_pipeline_bench

        result = await run_pipeline_bench(sessions=args.sessions, turns=args.turns,
                                          replicas={"stt": args.stt_replicas, **args.replicas},
                                          spread_s=args.spread,
                                          capture=args.record, providers=args.providers)
    print(json.dumps(finite(result), indent=None if args.json else 2, allow_nan=False))
    return 0


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity (a percentile of nothing) as null: JSON has no NaN,
    and parsers other than Python's refuse it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def _replica_counts(text: str) -> dict[str, int]:
    """``ingress=2,stt=2`` → {"ingress": 2, "stt": 2}."""
    counts = {}
    for item in filter(None, text.split(",")):
        stage, _, count = item.partition("=")
        if stage not in sj.STAGES or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(
                f"{item!r}: want stage=count with a stage of {', '.join(sj.STAGES)}")
        counts[stage] = int(count)
    return counts


def _call_counts(text: str) -> list[int]:
    """``20`` → [20]; ``1,20,50`` → [1, 20, 50] (a capacity ladder, smallest first)."""
    try:
        counts = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or counts != sorted(counts):
        raise argparse.ArgumentTypeError(f"{text!r}: want a count of calls, or counts in "
                                         "ascending order (1,20,50)")
    return counts


def _bus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--nkey", default="", help="the operator's nkey seed file (default: "
                        "$VOICEBUS_NATS_NKEY_FILE)")


def _caller_arguments(parser: argparse.ArgumentParser, who: str) -> None:
    """What a call says and to whom: ``voicebus call``'s and ``voicebus up``'s alike, so the
    one call code (``cmd_call``) finds every one of them on either."""
    parser.add_argument("--agent", default="", help="the agent profile to talk to (GET "
                        "/api/agents lists them; default: the default one)")
    parser.add_argument("--wav", type=Path, action="append",
                        help=f"{who} this spoken question (repeatable)")
    parser.add_argument("--say", action="append",
                        help=f"{who} this sentence, said by Piper (repeatable)")
    parser.add_argument("--text", action="append",
                        help=f"{who} this in the chat, after the spoken ones (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("reply.wav"),
                        help="where the agent's voice is recorded")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voicebus", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole stack: nats-server, livekit-server, the five "
                        "stages and the token service with the web page")
    up.add_argument("--port", type=int, default=8080,
                    help="the token service and web page (0: any free port; a taken port stops "
                         "the launch, as for the two below)")
    up.add_argument("--livekit-port", type=int, default=7880)
    up.add_argument("--nats-port", type=int, default=4222)
    up.add_argument("--nats-cluster", type=int, default=1,
                    help="nats-server nodes: a cluster of N on loopback (the first on "
                    "--nats-port), JetStream state replicated")
    up.add_argument("--livekit-nodes", type=int, default=1,
                    help="livekit-server nodes sharing one Redis (the first on --livekit-port): "
                    "rooms spread over them")
    up.add_argument("--sip-port", type=int, default=5060,
                    help="the SIP gateway's port on 127.0.0.1, UDP and TCP (a free one if taken; "
                    "-1: no gateway)")
    up.add_argument("--redis", action="store_true", help="a Redis for livekit-server even with "
                    "one node: its SIP API needs one (`voicebus sip setup`)")
    _caller_arguments(up, "once it is up, a call (as `voicebus call`) asks")
    up.add_argument("--once", action="store_true", help="stop after the --wav/--say/--text call")
    up.add_argument("--audio-dir", type=Path, help="turn the development file edges on for WAV "
                    "files below this folder (`voicebus session`); off by default")
    up.set_defaults(run=cmd_up)

    session = sub.add_parser("session", help="talk to a running stack with WAV files (below "
                             "its --audio-dir)")
    _bus_arguments(session)
    session.add_argument("--wav", type=Path, action="append", required=True)
    session.add_argument("--out", type=Path, default=Path("reply.wav"))
    session.set_defaults(run=converse)

    call = sub.add_parser("call", help="join a LiveKit room like a user: speak, record the reply")
    call.add_argument("--token-url", default="http://127.0.0.1:8080",
                      help="the token service (it also dispatches the agent)")
    call.add_argument("--room", default=f"call-{secrets.token_hex(3)}")
    call.add_argument("--identity", default="caller")
    _caller_arguments(call, "the caller asks")
    call.add_argument("--timeout", type=float, default=60.0, help="seconds to wait per reply")
    call.set_defaults(run=cmd_call)

    tap = sub.add_parser("tap", help="print a session's events (or every session's)")
    tap.add_argument("session", nargs="?")
    _bus_arguments(tap)
    tap.add_argument("--audio", action="store_true", help="print audio frames too")
    tap.set_defaults(run=cmd_tap)

    rec = sub.add_parser("record", help="the bus's recording of sessions (JetStream)")
    rec_sub = rec.add_subparsers(dest="action", required=True)
    for name, text in (("setup", "create or update the capture stream (VOICEBUS_RECORD…)"),
                       ("list", "captured and imported sessions")):
        _bus_arguments(rec_sub.add_parser(name, help=text))
    exp = rec_sub.add_parser("export", help="one session into a .vbus file")
    exp.add_argument("session")
    exp.add_argument("-o", "--out", type=Path)
    aud = rec_sub.add_parser("audio", help="the call as the user heard it, into a WAV file")
    aud.add_argument("session")
    aud.add_argument("-o", "--out", type=Path)
    aud.add_argument("--mix", action="store_true", help="one channel instead of two")
    use = rec_sub.add_parser("usage", help="what the providers did (and cost) per turn, and "
                             "in all, in one session")
    use.add_argument("session")
    imp = rec_sub.add_parser("import", help="keep a .vbus file on this bus (not replayed)")
    imp.add_argument("file", type=Path)
    pur = rec_sub.add_parser("purge", help="delete everything kept of one session")
    pur.add_argument("session")
    for parser_ in (exp, aud, use, imp, pur):
        _bus_arguments(parser_)
    rec.set_defaults(run=cmd_record)

    rep = sub.add_parser("replay", help="a recording into one stage (or all) of a running "
                         "stack, under a new session id; prints that id last")
    rep.add_argument("file", type=Path)
    rep.add_argument("--into", required=True, choices=("stt", "llm", "tts", "egress", "all"))
    rep.add_argument("--speed", default="1", help="1: the recorded pace; max: as fast as the "
                     "stage takes it")
    rep.add_argument("--as", dest="as_session", default="", help="the new session id")
    rep.add_argument("--diff", action="store_true", help="then diff it against the recording")
    rep.add_argument("--json", action="store_true", help="the diff as JSON")
    _bus_arguments(rep)
    rep.set_defaults(run=cmd_replay)

    dif = sub.add_parser("diff", help="what a replayed session changed against its recording; "
                         "exit 0: nothing, 1: something")
    dif.add_argument("file", type=Path)
    dif.add_argument("session")
    dif.add_argument("--json", action="store_true")
    _bus_arguments(dif)
    dif.set_defaults(run=cmd_diff)

    credentials = sub.add_parser("credentials", help="write new bus credentials for a "
                                 "deployment: nats.conf and one nkey seed per role")
    credentials.add_argument("folder", type=Path)
    credentials.add_argument("--force", action="store_true", help="replace existing ones")
    credentials.set_defaults(run=cmd_credentials)

    sip = sub.add_parser("sip", help="phone calls through LiveKit SIP (docs/telephony.md)")
    sip_sub = sip.add_subparsers(dest="sip_command", required=True)
    sip_setup = sip_sub.add_parser("setup", help="create or update the inbound trunk and the "
                                   "dispatch rule that send a trunk's calls to the agent")
    sip_setup.add_argument("--livekit-url", default=os.environ.get("LIVEKIT_URL",
                                                                   "ws://127.0.0.1:7880"))
    sip_setup.add_argument("--name", default="voicebus", help="the trunk's and rule's name")
    sip_setup.add_argument("--number", action="append", default=[],
                           help="a phone number of the trunk, E.164 (repeatable; none: any)")
    sip_setup.add_argument("--allowed-address", action="append", default=[],
                           help="the trunk provider's address or CIDR range (repeatable)")
    sip_setup.add_argument("--auth-username", default="", help="digest authentication; the "
                           "password comes from VOICEBUS_SIP_AUTH_PASSWORD")
    sip_setup.add_argument("--room-prefix", default="call-", help="each call's room name "
                           "starts with this")
    sip_setup.set_defaults(run=cmd_sip_setup)

    dial = sub.add_parser("dial", help="have voicebus's SIP gateway call a number or a SIP "
                          "URI; prints the session it started as JSON")
    dial.add_argument("target", help="a number (through the gateway's VOICEBUS_SIP_DIAL_TRUNK) "
                      "or a sip: URI")
    dial.add_argument("--greeting", default="", help="what the agent says once they pick up")
    dial.add_argument("--caller-id", default="", help="the number or user the callee sees")
    dial.add_argument("--agent", default="", help="the agent profile that talks")
    dial.add_argument("--instructions", default="", help="instructions for this call only")
    dial.add_argument("--ring-timeout", type=float, default=30.0,
                      help="seconds to let it ring (1-120)")
    _bus_arguments(dial)
    dial.set_defaults(run=cmd_dial)

    say = sub.add_parser("say", help="speak a sentence into a WAV file with Piper")
    say.add_argument("text")
    say.add_argument("-o", "--out", type=Path, default=Path("question.wav"))
    say.set_defaults(run=cmd_say)

    bench = sub.add_parser("bench", help="measure; prints one JSON object")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    pipeline = bench_sub.add_parser("pipeline", help="voice-to-voice over the bus, N sessions")
    pipeline.add_argument("--sessions", type=int, default=1)
    pipeline.add_argument("--turns", type=int, default=5)
    pipeline.add_argument("--stt-replicas", type=int, default=1)
    pipeline.add_argument("--replicas", type=_replica_counts, default={},
                          help="replicas per stage, e.g. ingress=2,stt=2 (default 1 each)")
    pipeline.add_argument("--spread", type=float, default=5.0,
                          help="seconds over which session starts are spread")
    pipeline.add_argument("--providers", choices=("offline", "instant"), default="offline",
                          help="offline: the stack's models; instant: answers at once (fixed "
                          "transcript, echo, a tone), to size the system itself")
    pipeline.add_argument("--record", choices=("off", "events", "all"), default="",
                          help="capture during the run (default: VOICEBUS_RECORD, else all)")
    pipeline.add_argument("--json", action="store_true", help="one line of JSON")
    pipeline.set_defaults(run=cmd_bench)
    stt = bench_sub.add_parser("stt", help="key words and final latency on voices never used "
                               "(espeak-ng, flite)")
    stt.add_argument("--providers", default="pocketsphinx,whisper")
    stt.add_argument("--pace", type=float, default=1.0,
                     help="1: frames at the microphone's pace; 0: as fast as taken")
    stt.add_argument("--voices", type=int, default=0, help="the first N voices (0: all)")
    stt.add_argument("--phrases", type=int, default=0, help="the first N phrases (0: all)")
    stt.add_argument("--json", action="store_true", help="one line of JSON")
    stt.set_defaults(run=cmd_bench)
    turns = bench_sub.add_parser("turns", help="false cut-offs and the wait after the user's "
                                 "last word, on voices never used (espeak-ng, flite)")
    turns.add_argument("--provider", default="whisper")
    turns.add_argument("--silence-ms", default="",
                       help="the VAD's silence windows to try, comma-separated (default: "
                       "VOICEBUS_VAD_SILENCE_MS, else the stage's default)")
    turns.add_argument("--statement-ms", default="",
                       help="the statement holds to try, comma-separated (default: "
                       "VOICEBUS_STT_EOT_STATEMENT_MS, else the stage's default)")
    turns.add_argument("--pause-ms", type=int, default=700,
                       help="the pause inside a phrase left hanging")
    turns.add_argument("--voices", type=int, default=0, help="the first N voices (0: all)")
    turns.add_argument("--phrases", type=int, default=0,
                       help="the first N of bench stt's phrases (0: all)")
    turns.add_argument("--smart-turn", action="store_true",
                       help="also ask the audio end-of-turn model Smart Turn v3.2 (its weights "
                       "come from PyPI's pipecat-ai wheel the first time)")
    turns.add_argument("--json", action="store_true", help="one line of JSON")
    turns.set_defaults(run=cmd_bench)
    livekit = bench_sub.add_parser("livekit", help="voice-to-voice at a user in a LiveKit room")
    livekit.add_argument("--turns", type=int, default=5)
    livekit.add_argument("--json", action="store_true", help="one line of JSON")
    livekit.set_defaults(run=cmd_bench)
    bargein = bench_sub.add_parser("barge-in", help="how fast the agent falls silent when the "
                                   "user cuts in; false interruptions by a cough or an uh-huh")
    bargein.add_argument("--trials", type=int, default=5,
                         help="each: one interruption, one cough, one backchannel")
    bargein.add_argument("--seed", type=int, default=1, help="cough noise and listening times")
    bargein.add_argument("--json", action="store_true", help="one line of JSON")
    bargein.set_defaults(run=cmd_bench)
    redeploy = sub.add_parser("redeploy", help="replace every replica of a stage of a running "
                              "`voicebus up`, one at a time, while calls go on")
    redeploy.add_argument("stage", choices=sj.STAGES)
    _bus_arguments(redeploy)
    redeploy.add_argument("--timeout", type=float, default=300.0)
    redeploy.set_defaults(run=cmd_redeploy)
    sip_bench = bench_sub.add_parser("sip", help="real SIP calls into the SIP gateway (the "
                                     "bench is the phone): V2V at the phone, calls carried")
    sip_bench.add_argument("--calls", type=_call_counts, default=[1],
                           help="concurrent calls; 1,20,50 runs each in turn and reports the "
                           "capacity (the largest carried with v2v p95 within 1.5x the first)")
    sip_bench.add_argument("--turns", type=int, default=5, help="questions per call")
    sip_bench.add_argument("--providers", choices=("offline", "instant"), default="offline",
                           help="offline: the models `voicebus up` runs; instant: answers at "
                           "once (fixed transcript, echo, a tone), to size the system itself")
    sip_bench.add_argument("--spread", type=float, default=5.0,
                           help="seconds over which the calls are placed")
    sip_bench.add_argument("--gap", type=float, default=1.5, help="seconds of the agent's "
                           "silence that end its reply (then the phone asks again)")
    sip_bench.add_argument("--timeout", type=float, default=30.0,
                           help="seconds the phone waits for an answer, the greeting or a reply")
    sip_bench.add_argument("--json", action="store_true", help="one line of JSON")
    sip_bench.set_defaults(run=cmd_bench)
    chaos = bench_sub.add_parser("chaos", help="two replicas of every stage; owners killed or "
                                 "stopped mid-call: turns lost, recovery time, stale audio")
    chaos.add_argument("--calls", type=int, default=10)
    chaos.add_argument("--kills", type=int, default=20)
    chaos.add_argument("--stage", choices=(*sj.STAGES, "all", "nats"), default="all",
                       help="whose replicas are killed; nats: nodes of the NATS cluster")
    chaos.add_argument("--nats-cluster", type=int, default=1,
                       help="nats-server nodes (3 for --stage nats)")
    chaos.add_argument("--kill-nats-node", dest="stage", action="store_const", const="nats",
                       help="the same as --stage nats")
    chaos.add_argument("--signal", choices=("KILL", "TERM"), default="KILL")
    chaos.add_argument("--turns", type=int, default=3, help="questions per call")
    chaos.add_argument("--seed", type=int, default=1, help="which questions, and when")
    chaos.add_argument("--json", action="store_true", help="one line of JSON")
    chaos.set_defaults(run=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = asyncio.run(args.run(args))
    except KeyboardInterrupt:
        code = 130
    exit_process(code or 0)
