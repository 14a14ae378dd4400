"""Nothing on the bus makes a stage touch a file of the publisher's choosing: the development
file edges are off unless VOICEBUS_AUDIO_DIR names a folder, and then only WAV files below it
(symlinks resolved) are read or written. Real ingress and egress processes, real nats-server."""

from __future__ import annotations

from pathlib import Path

import pytest

from proto import events as ev
from proto import subjects as sj
from tests.conftest import LogTail
from voicebus.client import Tap, dispatch
from voicebus.launcher import Stack


async def _stack(tmp_path: Path, audio_dir: Path | None) -> tuple[Stack, Tap]:
    stack = Stack(tmp_path, sink=LogTail(tmp_path / "stack.log"), audio_dir=audio_dir)
    await stack.start(stages=("ingress", "egress"))
    return stack, Tap(await stack.connect())


async def _refused(tap: Tap, session: str, stage: str, **files) -> str:
    await tap.watch(sj.session_all(session))
    await dispatch(tap.nc, tap, session, stages=(stage,), **files)
    errors = await tap.wait_for(lambda: tap.of(ev.StageError, session, stage=stage), 10,
                                f"{stage} to refuse the file")
    return errors[0].message


async def test_file_edges_are_off_unless_a_folder_is_configured(tmp_path) -> None:
    stack, tap = await _stack(tmp_path, audio_dir=None)
    target = tmp_path / "written-by-a-stranger.wav"
    secret = tmp_path / "private.wav"
    secret.write_bytes(b"RIFF....WAVE")
    try:
        assert "file edges are off" in await _refused(tap, "off-out", "egress",
                                                      wav_out=str(target))
        assert "file edges are off" in await _refused(tap, "off-in", "ingress",
                                                      wav_in=[str(secret)])
    finally:
        await tap.close()
        await tap.nc.close()
        codes = await stack.stop()
    assert not target.exists()
    assert all(code == 0 for code in codes.values()), codes


@pytest.mark.parametrize("where", ["outside", "symlink out", "not a wav"])
async def test_only_wav_files_below_the_folder(tmp_path, where) -> None:
    audio = tmp_path / "audio"
    audio.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = {"outside": outside / "reply.wav", "symlink out": audio / "link" / "reply.wav",
              "not a wav": audio / "reply.txt"}[where]
    if where == "symlink out":
        (audio / "link").symlink_to(outside)
    stack, tap = await _stack(tmp_path, audio_dir=audio)
    try:
        message = await _refused(tap, "edge", "egress", wav_out=str(target))
    finally:
        await tap.close()
        await tap.nc.close()
        await stack.stop()
    assert "outside VOICEBUS_AUDIO_DIR" in message or "not an absolute path" in message, message
    assert not (outside / "reply.wav").exists() and not (audio / "reply.txt").exists()
