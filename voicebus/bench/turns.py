"""``voicebus bench turns``: does the end-of-turn rule wait for the user, on voices the project
never used, and how long does it make a finished user wait?

The voices and complete sentences are ``bench stt``'s, plus sentences whose commas make the
voices pause mid-sentence; the phrases left hanging ("I want to…", a pause, then the rest) are
spoken in two parts joined by ``--pause-ms`` of quiet. Each clip goes through the real VAD
(``VadSegmenter`` with the ingress settings, the silence window swept by ``--silence-ms``) and
its utterances through the real STT provider; the STT's end-of-turn rule
(``EndOfTurnHolds``, the STT settings, the statement hold swept by ``--statement-ms``) then
decides, in audio time, which utterances close a turn: one closes when the next does not start
within its hold. The provider's compute is left
out, which only ever shortens the wait, so the cut-offs counted are an upper bound.

- ``false_cutoffs``: complete sentences (``bench stt``'s) answered before their last word (a
  turn closed before the sentence's last utterance); ``paused_cutoffs`` the same for the
  sentences with commas;
- ``hanging_waited``: hanging phrases answered once, with all their words;
- ``wait_ms``: the user's last speech sample → the turn's final, for complete sentences
  (the VAD's silence window plus the hold), p50 / p95.

``--smart-turn`` also asks an audio end-of-turn model (``smart_turn.py``) about every end of
speech the VAD finds, at the first setting: the ends of sentences (each clip's last utterance)
against the pauses inside them (the others: at a comma, after a hanging phrase), at the VAD's
end edge and after 100 ms of quiet, and replays the rule with a statement or question held like
a lone answer when the model hears the speaker unfinished at the edge (``lengthened``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.ingress.audio import FRAME_BYTES
from services.ingress.service import IngressConfig
from services.ingress.vad import VadSegmenter
from services.runtime.providers import load_provider
from services.runtime.turns import words
from services.stt.config import SttConfig
from services.stt.endpoint import EndOfTurnHolds, joined
from services.stt.provider import PROVIDERS
from voicebus.bench.pipeline import stats
from voicebus.bench.stt import PHRASES, VOICES, missing_tools, speak

# Complete sentences in which the voices pause at a comma.
PAUSED = (
    "yes, please call my mother",
    "well, what time is it in tokyo",
    "first turn off the lights, then lock the front door",
    "okay, so how far is the airport from here",
    "no, i said tomorrow morning, not tonight",
)
# Phrases left hanging, and the rest the user says after a pause.
HANGING = (
    ("i want to", "book a table for two"),
    ("i would like to", "order a pizza"),
    ("please remind me to", "call the dentist"),
    ("i was thinking about", "going to the cinema"),
    ("send a message to", "my brother"),
)
TAIL_MS = 1500  # quiet after each clip, so the last utterance's end edge comes


@dataclass(frozen=True, slots=True)
class Utterance:
    started_ms: int  # when the VAD's start edge went out (audio time)
    last_speech_ms: int
    edge_ms: int  # when its end edge went out
    audio: bytes  # from the STT's pre-roll to the end edge


def segment(audio: bytes, vad: VadSegmenter, preroll_ms: int) -> list[Utterance]:
    """The clip's utterances as ingress and the STT cut them."""
    vad.reset()
    audio += bytes(16000 * 2 * TAIL_MS // 1000)
    out: list[Utterance] = []
    start = begun = 0
    for n, i in enumerate(range(0, len(audio) - FRAME_BYTES + 1, FRAME_BYTES)):
        pts = n * 20
        for edge in vad.push(audio[i:i + FRAME_BYTES], pts):
            now = pts + 20  # the edge goes out with the frame that completed it
            if edge.kind == "start":
                start, begun = edge.pts_ms, now
            else:
                first = max(0, start - preroll_ms) * 32
                out.append(Utterance(begun, edge.pts_ms, now, audio[first:now * 32]))
    return out


class Ear:
    """The provider's final for an utterance, each distinct one decoded once."""

    def __init__(self, stt: Any) -> None:
        self.stt = stt
        self.heard: dict[bytes, str] = {}

    async def __call__(self, audio: bytes) -> str:
        key = hashlib.sha1(audio).digest()
        if key not in self.heard:
            async def frames():
                for i in range(0, len(audio) - FRAME_BYTES + 1, FRAME_BYTES):
                    yield audio[i:i + FRAME_BYTES]

            final = ""
            async for result in self.stt.stream(frames()):
                if result.final:
                    final = result.text
            self.heard[key] = final
        return self.heard[key]


def answered(utterances: list[Utterance], texts: list[str], holds: EndOfTurnHolds,
             unfinished: list[bool] | None = None) -> list[tuple[int, str, int]]:
    """The turns the end-of-turn rule closes with words: (final at ms, text, last speech ms).
    A turn goes on when the next utterance starts within the hold after an end edge. An
    utterance ``unfinished`` (by the audio model) waits at least as long as a lone answer."""
    out: list[tuple[int, str, int]] = []
    so_far = ""
    for index, (utterance, text) in enumerate(zip(utterances, texts)):
        so_far = joined(so_far, text)
        hold = holds.hold_ms(so_far)
        if unfinished is not None and unfinished[index] and words(so_far):
            hold = max(hold, holds.brief_ms)
        release = utterance.edge_ms + hold
        following = utterances[index + 1] if index + 1 < len(utterances) else None
        if following is not None and following.started_ms < release:
            continue
        if words(so_far):
            out.append((release, so_far, utterance.last_speech_ms))
        so_far = ""
    return out


async def run_turns_bench(provider: str, silence_ms: list[int], statement_ms: list[int],
                          voices: int = 0, phrases: int = 0, pause_ms: int = 700,
                          smart_turn: bool = False) -> dict[str, Any]:
    if missing := missing_tools():
        raise RuntimeError(f"the unseen voices need {', '.join(missing)} "
                           f"(Debian: apt-get install {' '.join(missing)})")
    folder = Path(tempfile.mkdtemp(prefix="voicebus-turns-bench-"))
    chosen = VOICES[:voices or len(VOICES)]
    sentences = [text for text, _ in PHRASES[:phrases or len(PHRASES)]] + list(PAUSED)
    pause = bytes(16000 * 2 * pause_ms // 1000)
    complete, hanging = [], []
    for i, (_, command) in enumerate(chosen):
        for j, text in enumerate(sentences):
            complete.append((text in PAUSED, speak(command, text, folder / f"c{i}-{j}.wav")))
        for j, (first, rest) in enumerate(HANGING):
            hanging.append(speak(command, first, folder / f"h{i}-{j}a.wav") + pause
                           + speak(command, rest, folder / f"h{i}-{j}b.wav"))
    stt_config = SttConfig.from_env(os.environ)
    vad_config = IngressConfig.from_env(os.environ)
    silence_ms = silence_ms or [vad_config.vad_silence_ms]
    statement_ms = statement_ms or [stt_config.stt_eot_statement_ms]
    stt = load_provider("stt", PROVIDERS, provider, stt_config)
    ear = Ear(stt)
    settings: dict[str, Any] = {}
    try:
        for silence, statement in [(a, b) for a in silence_ms for b in statement_ms]:
            vad = VadSegmenter(threshold=vad_config.vad_threshold,
                               neg_threshold=vad_config.vad_neg_threshold,
                               min_speech_ms=vad_config.vad_min_speech_ms, silence_ms=silence,
                               energy_floor_dbfs=vad_config.vad_energy_floor_dbfs)
            holds = EndOfTurnHolds(stt_config.stt_eot_question_ms, statement,
                                   stt_config.stt_eot_incomplete_ms, stt_config.stt_eot_brief_ms)
            cutoffs, waits, waited, examples = [0, 0], [], 0, []
            for paused, audio in complete:
                utterances = segment(audio, vad, stt_config.stt_preroll_ms)
                turns = answered(utterances, [await ear(u.audio) for u in utterances], holds)
                if len(turns) > 1:
                    cutoffs[paused] += 1
                    examples.append([text for _, text, _ in turns])
                if turns:
                    release, _, last_speech = turns[-1]
                    waits.append(release - last_speech)
            for audio in hanging:
                utterances = segment(audio, vad, stt_config.stt_preroll_ms)
                turns = answered(utterances, [await ear(u.audio) for u in utterances], holds)
                if len(turns) == 1:
                    waited += 1
                else:
                    examples.append([text for _, text, _ in turns])
            settings[f"silence {silence} / statement {statement}"] = {
                "false_cutoffs": cutoffs[False],
                "complete": sum(not paused for paused, _ in complete),
                "paused_cutoffs": cutoffs[True], "paused": sum(p for p, _ in complete),
                "hanging_waited": waited, "hanging": len(hanging),
                "wait_ms": stats([float(w) for w in waits]),
                "missed": examples[:8],
            }
        if smart_turn:
            vad = VadSegmenter(threshold=vad_config.vad_threshold,
                               neg_threshold=vad_config.vad_neg_threshold,
                               min_speech_ms=vad_config.vad_min_speech_ms,
                               silence_ms=silence_ms[0],
                               energy_floor_dbfs=vad_config.vad_energy_floor_dbfs)
            holds = EndOfTurnHolds(stt_config.stt_eot_question_ms, statement_ms[0],
                                   stt_config.stt_eot_incomplete_ms, stt_config.stt_eot_brief_ms)
            settings["smart_turn"] = await _ask_smart_turn(
                complete, hanging, vad, holds, ear, stt_config,
                f"silence {silence_ms[0]} / statement {statement_ms[0]}")
    finally:
        await stt.aclose()
    return {"provider": provider, "voices": [v for v, _ in chosen], "pause_ms": pause_ms,
            "holds_ms": {"question": stt_config.stt_eot_question_ms,
                         "brief": stt_config.stt_eot_brief_ms,
                         "incomplete": stt_config.stt_eot_incomplete_ms},
            "settings": settings}


# After this much quiet, whether the model could end the turn before the VAD's window.
EARLY_MS = 100
EARLY_P = 0.9


async def _ask_smart_turn(complete: list[tuple[bool, bytes]], hanging: list[bytes],
                          vad: VadSegmenter, holds: EndOfTurnHolds, ear: Ear,
                          stt_config: SttConfig, setting: str) -> dict[str, Any]:
    """What the audio model hears at each end of speech, and the rule with its say."""
    from voicebus.bench.smart_turn import FILE, WHEEL, SmartTurn, fetch

    model = SmartTurn(await asyncio.to_thread(fetch, Path(stt_config.whisper_cache)))
    tail = bytes(16000 * 2 * TAIL_MS // 1000)
    # The model's scores at each end of speech: [sentence ends, pauses inside], at the VAD's
    # end edge and after EARLY_MS of quiet.
    scores: dict[str, tuple[list[float], list[float]]] = {"at_edge": ([], []),
                                                           f"after_{EARLY_MS}ms": ([], [])}
    cutoffs, waits, waited, ms = [0, 0], [], 0, []
    clips = [(paused, audio, False) for paused, audio in complete]
    clips += [(False, audio, True) for audio in hanging]
    for paused, audio, hangs in clips:
        utterances, clip = segment(audio, vad, stt_config.stt_preroll_ms), audio + tail
        unfinished = []
        for index, utterance in enumerate(utterances):
            is_end = index == len(utterances) - 1
            started = time.perf_counter()
            at_edge = model.complete(clip[:utterance.edge_ms * 32])
            ms.append((time.perf_counter() - started) * 1000)
            early = model.complete(clip[:(utterance.last_speech_ms + EARLY_MS) * 32])
            scores["at_edge"][not is_end].append(at_edge)
            scores[f"after_{EARLY_MS}ms"][not is_end].append(early)
            unfinished.append(at_edge < 0.5)
        turns = answered(utterances, [await ear(u.audio) for u in utterances], holds,
                         unfinished)
        if hangs:
            waited += len(turns) == 1
            continue
        cutoffs[paused] += len(turns) > 1
        if turns:
            release, _, last_speech = turns[-1]
            waits.append(release - last_speech)
    (edge_ends, edge_pauses), (early_ends, early_pauses) = scores.values()
    return {
        "model": f"{FILE} ({WHEEL})", "setting": setting, "ms_per_call": stats(ms),
        "sentence_ends": len(edge_ends), "pauses_inside": len(edge_pauses),
        # Judged finished (p >= 0.5) at the VAD's end edge: all ends, no pauses, is right.
        "ends_heard_finished": sum(p >= 0.5 for p in edge_ends),
        "pauses_heard_finished": sum(p >= 0.5 for p in edge_pauses),
        # Sure (p >= EARLY_P) after EARLY_MS of quiet: a turn the model could end sooner…
        "ends_sure_early": sum(p >= EARLY_P for p in early_ends),
        # …and a sentence it would cut (a lower bound: the VAD's window splits no pause
        # shorter than itself, so the pauses between EARLY_MS and it are not counted).
        "pauses_sure_early": sum(p >= EARLY_P for p in early_pauses),
        # How well the scores tell ends from pauses: the chance that an end scores above a
        # pause (0.5: a coin; 1: always).
        "auc": {"at_edge": auc(edge_ends, edge_pauses),
                f"after_{EARLY_MS}ms": auc(early_ends, early_pauses)},
        "lengthened": {"false_cutoffs": cutoffs[False], "paused_cutoffs": cutoffs[True],
                       "hanging_waited": waited, "wait_ms": stats([float(w) for w in waits])},
    }


def auc(positives: list[float], negatives: list[float]) -> float:
    """The chance that a random positive scores above a random negative (a tie counts half):
    the area under the ROC curve, by counting pairs."""
    if not positives or not negatives:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return round(wins / (len(positives) * len(negatives)), 3)
