"""``voicebus bench sip`` end to end: the CLI starts nats-server, the five stages and the SIP
gateway, and its phone (services/sip/cmd/phone, built by scripts/install-sip-gateway.sh) places
real SIP calls with RTP. Two calls of one question each, with the ``instant`` providers (no model
on the path, so it is quick): every call answered, every turn completed and measured, the phone
hung up. Correctness only: no latency bound is asserted (docs/benchmarks.md has the figures)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from voicebus.bench.sip import heard_voice_s

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def positive(summary: dict[str, float], n: int) -> bool:
    return summary["n"] == n and all(
        math.isfinite(summary[k]) and summary[k] > 0 for k in ("p50", "p95"))


@pytest.fixture(scope="module")
def phone() -> str:
    """Built before the bench runs, so that a first build's minute is not the bench's."""
    done = subprocess.run([str(ROOT / "scripts/install-sip-phone.sh")], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.timeout(600)
def test_two_calls_into_the_gateway_are_answered_and_measured(phone: str) -> None:
    assert Path(phone).is_file()
    done = subprocess.run(
        [sys.executable, "-m", "voicebus", "bench", "sip", "--calls", "2", "--turns", "1",
         "--providers", "instant", "--spread", "0", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    logs = Path(result["logs"])
    context = f"{json.dumps(result, indent=1)}\nlogs: {logs}"

    assert (result["calls"], result["sessions"], result["calls_answered"]) == (2, 2, 2), context
    assert result["calls_failed"] == 0 and result["failures"] == [], context
    assert result["turns_expected"] == result["turns_completed"] == 2, context
    assert result["hangups"] == {"bye": 2, "remote": 0}, context
    assert result["providers"] == "instant" and result["errors"] == 0, context
    # Every turn has the phone's V2V and the bus's view of the same reply.
    for key in ("v2v_ms", "pipeline_v2v_ms", "eos_ms", "setup_ms", "reply_heard_ms"):
        assert positive(result[key], 2), (key, context)
    for leg in ("in", "out"):
        assert result["legs_ms"][leg]["n"] == 2 and math.isfinite(result["legs_ms"][leg]["p50"])
    # The legs add up to the phone's V2V turn by turn; the p50 of two turns is their mean, so
    # the p50s add up too (each rounded to 0.01 ms).
    parts = (result["legs_ms"]["in"]["p50"] + result["pipeline_v2v_ms"]["p50"]
             + result["legs_ms"]["out"]["p50"])
    assert abs(parts - result["v2v_ms"]["p50"]) < 0.1, context
    for stage in ("stt", "llm", "tts"):
        assert result["compute_ms"][stage]["n"] == 2, context
    # The phone streamed RTP the whole call and heard the agent: each call's recording holds
    # voice (the greeting and the answer's tone).
    phone_stats = result["phone"]
    assert phone_stats["packets_sent"] > 0 and phone_stats["packets_heard"] > 0, context
    wavs = sorted(Path(result["heard_wavs"]).glob("call-*.wav"))
    assert len(wavs) == 2, context
    assert all(heard_voice_s(wav) > 0 for wav in wavs), context
    assert isinstance(result["carried"], bool) and isinstance(result["cpu_s"]["sip"], float)
