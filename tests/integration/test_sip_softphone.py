"""A real softphone calls the offline agent: Debian's baresip, its microphone a WAV file.

The stack is what ``voicebus up`` runs for a phone (every stage as a process, the offline ear,
the SIP gateway started by the launcher on a free port). baresip (scripts/install-baresip.sh)
is configured here with no sound card: ``aufile`` reads the Piper-spoken question as its
microphone, ``sndfile`` writes what it hears to a WAV file, and its TCP control socket
(``ctrl_tcp``, netstring JSON) hangs up once the bus shows the answer played. Whisper must hear
the agent's answer in baresip's recording, and the hang-up must end the session."""

from __future__ import annotations

import asyncio
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import soxr

from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import Resampler, read_wav
from tests.conftest import running_stack
from tests.e2e.test_phone import hear
from tests.integration.test_sip_gateway import tool
from voicebus.client import Tap
from voicebus.launcher import offline_ear, udp_port
from voicebus.speech import say_to_wav

pytestmark = pytest.mark.e2e

CALLER = "softphone"
# What baresip's jitter buffer may hold back when we hang up (its default is up to 10 frames).
JITTER_FRAMES = 10
CONFIG = """\
poll_method             epoll
sip_listen              127.0.0.1:{sip_port}
sip_trans_def           udp
audio_source            aufile,{question}
audio_player            aubridge,nowhere
audio_alert             aubridge,nowhere
ausrc_srate             8000
auplay_srate            8000
ausrc_channels          1
auplay_channels         1
rtp_ports               {rtp_low}-{rtp_high}
module_path             /usr/lib/baresip/modules
module                  g711.so
module                  aufile.so
module                  aubridge.so
module                  sndfile.so
module_app              account.so
module_app              menu.so
module_app              ctrl_tcp.so
ctrl_tcp_listen         127.0.0.1:{ctrl_port}
snd_path                {dumps}
"""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def sip_stack(tmp_path_factory: pytest.TempPathFactory):
    async for running in running_stack(tmp_path_factory, livekit=False, env=offline_ear(),
                                       sip=True):
        yield running


async def control(port: int, command: str, params: str = "") -> dict:
    """One command on baresip's ctrl_tcp socket: a netstring of JSON, answered likewise."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = json.dumps({"command": command, "params": params, "token": command}).encode()
        writer.write(b"%d:%s," % (len(body), body))
        await writer.drain()
        while True:  # events may come first; the response carries our token
            size = int((await reader.readuntil(b":"))[:-1])
            reply = json.loads((await reader.readexactly(size + 1))[:-1])
            if reply.get("response"):
                return reply
    finally:
        writer.close()


async def recorded(dumps: Path, size: int, timeout: float) -> None:
    """Until baresip's recording of what it heard holds ``size`` bytes of audio."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (files := list(dumps.glob("*-dec.wav"))) or files[0].stat().st_size < 44 + size:
        if loop.time() > deadline:
            have = [f.stat().st_size for f in files]
            raise AssertionError(f"baresip recorded {have} bytes, not {44 + size}")
        await asyncio.sleep(0.1)  # a file gives no event to wait on


async def ctrl_ready(proc: asyncio.subprocess.Process, port: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if proc.returncode is not None or loop.time() > deadline:
                raise AssertionError("baresip's control socket never opened") from None
            await asyncio.sleep(0.1)  # polling a port that is not open yet


@pytest.mark.asyncio(loop_scope="module")
async def test_baresip_calls_the_agent_with_a_wav_microphone_and_hears_the_answer(
        sip_stack, tmp_path: Path) -> None:
    stack = sip_stack
    baresip = tool("scripts/install-baresip.sh")
    # The question at 8 kHz mono (what aufile wants at ausrc_srate 8000), then a minute of
    # silence: aufile's end of file would stop the microphone, and the call must outlive the
    # answer however slow this machine is today.
    pcm, rate, channels = read_wav(await say_to_wav("What time is it?", tmp_path / "q.wav",
                                                    lead_ms=400))
    resampler = Resampler(rate, channels)
    wide = np.frombuffer(resampler.process(pcm) + resampler.flush(), np.int16)
    narrow = soxr.resample(wide, 16000, 8000).astype(np.int16).tobytes() + bytes(2 * 8000 * 60)
    question = tmp_path / "question-8k.wav"
    with wave.open(str(question), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(narrow)

    home, dumps = tmp_path / "baresip", tmp_path / "dumps"
    home.mkdir()
    dumps.mkdir()
    rtp_low, ctrl_port = udp_port(), udp_port()
    (home / "config").write_text(CONFIG.format(
        sip_port=udp_port(), question=question, rtp_low=rtp_low, rtp_high=rtp_low + 1,
        ctrl_port=ctrl_port, dumps=dumps))
    (home / "accounts").write_text(f"<sip:{CALLER}@127.0.0.1>;regint=0\n")

    nc = await stack.connect()
    tap = Tap(nc)
    await tap.watch(sj.everything())
    phone = await asyncio.create_subprocess_exec(
        baresip, "-f", str(home), "-e", f"/dial sip:agent@127.0.0.1:{stack.sip_port}",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        await ctrl_ready(phone, ctrl_port, 30)
        (start,) = await tap.wait_for(lambda: tap.of(ev.PhoneSessionStart, topic=sj.CTL_START),
                                      30, "the call's session")
        session = start.session
        (played,) = await tap.wait_for(
            lambda: tap.of(ev.Playback, session, turn=1, final=True), 90, "the answer played")
        (final,) = tap.of(ev.Transcript, session, turn=1, final=True)
        # Every frame the agent sent must reach baresip's recording (which keeps only what
        # came, no silence between replies) before the hang-up; baresip's jitter buffer may
        # still hold the last few.
        sent = len(tap.of(ev.AudioFrame, session, topic=sj.EGRESS_AUDIO))
        assert sent * 20 >= played.played_ms - 20
        await recorded(dumps, 320 * (sent - JITTER_FRAMES), 15)
        await control(ctrl_port, "hangup")
        (end,) = await tap.wait_for(lambda: tap.of(ev.SessionEnd, session, topic=sj.CTL_END), 15,
                                    "the hang-up on the bus")
        await control(ctrl_port, "quit")
        out, _ = await asyncio.wait_for(phone.communicate(), 15)
    finally:
        if phone.returncode is None:
            phone.kill()
            await phone.communicate()
        await tap.close()
        await nc.close()

    log = out.decode(errors="replace")
    assert start.caller == CALLER and start.sample_rate == 8000, log[-3000:]
    assert "time" in final.text.lower(), final.text
    assert end.reason == "caller hung up"
    (heard,) = dumps.glob("*-dec.wav")
    with wave.open(str(heard), "rb") as w:
        assert (w.getframerate(), w.getnchannels()) == (8000, 1), log[-3000:]
        answer = w.readframes(w.getnframes())
    said = await hear(answer)
    assert "time" in said, (said, log[-3000:])
