"""What the providers did for each turn, in the units vendors bill, and what it cost.

A stage meters a turn from the task that does its work: ``metering()`` at the start,
``publish(worker, meter, turn)`` at the end, which sends one ``Usage`` event per provider that
worked on the turn (``<stage>.usage``) and counts ``voicebus_usage_total{stage,provider,unit}``
and, with prices, ``voicebus_cost_usd_total{stage,provider}``.

The meter is filled where the work happens, so each provider is charged for what it was given:
the fallback adapter (``services/runtime/fallback.py``) counts a request per attempt, the audio
(STT) or text (TTS) each provider actually read, and the audio a TTS provider made; an LLM
provider reports the tokens its API counted (``report_tokens``). A provider that fails after
reading half an utterance is charged that half, and the next one the whole utterance, as the
vendors would bill them. The current turn's meter rides in a context variable: a provider needs
no parameter for it, and work outside a turn (the chain's probes) is never charged to one.

Prices (``VOICEBUS_PRICES``, docs/providers.md) are USD per unit per ``stage.provider``: a TOML
file, or the same entries inline, e.g.
``llm.openai.input_tokens=0.15/1M,llm.openai.output_tokens=0.6/1M,stt.deepgram.audio_in_s=0.0043/min``.
Without a price for a provider, its events carry no cost (``None``), not a pretended zero.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import tomllib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from proto import events as ev
from proto import subjects as sj
from services.runtime import metrics
from services.runtime.errors import ConfigError

log = logging.getLogger(__name__)

TOKENS = ("input_tokens", "output_tokens", "cached_tokens")
UNITS = ("requests", *TOKENS, "characters", "audio_in_s", "audio_out_s")
# What the stage measures itself on every attempt (0 is a measurement); tokens are known only
# once an API reports them.
MEASURED = {"stt": frozenset({"requests", "audio_in_s"}), "llm": frozenset({"requests"}),
            "tts": frozenset({"requests", "characters", "audio_out_s"})}
_STT_BYTES_PER_S = ev.INGRESS_RATE * 2  # s16le mono
# "PRICE/AMOUNT": the price of this many units.
_AMOUNTS = {"k": 1e3, "M": 1e6, "min": 60.0, "h": 3600.0}


@dataclass(slots=True)
class Counts:
    """One provider's work on one turn."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    characters: int = 0
    audio_in_s: float = 0.0
    audio_out_s: float = 0.0
    failed: bool = False
    measured: set[str] = field(default_factory=set)
    # Token counts the API reported: one per request (a completion read to its end); with
    # fewer, some round's tokens are missing and the token units are not measured.
    token_reports: int = 0

    def measured_units(self) -> set[str]:
        """The units measured for the whole turn: tokens only if every request reported."""
        if self.token_reports == self.requests:
            return self.measured
        return self.measured - set(TOKENS)


class Meter:
    """What the providers of one stage did for one turn, by provider (in the order used)."""

    def __init__(self) -> None:
        self.providers: dict[str, Counts] = {}
        self.closed = False

    def of(self, provider: str) -> Counts:
        return self.providers.setdefault(provider, Counts())


_METER: contextvars.ContextVar[Meter | None] = contextvars.ContextVar("voicebus_usage",
                                                                      default=None)


def metering() -> Meter:
    """Meter the turn the current task works on: providers called from this task (and from
    tasks it starts from now on) are charged to the meter returned."""
    meter = Meter()
    _METER.set(meter)
    return meter


def attempt(stage: str, provider: str) -> Counts | None:
    """A turn asks ``provider``: one request more. ``None`` outside a metered turn."""
    meter = _METER.get()
    if meter is None or meter.closed:
        return None
    counts = meter.of(provider)
    counts.requests += 1
    counts.measured |= MEASURED.get(stage, frozenset())
    return counts


def metered_input(stage: str, counts: Counts | None,
                  items: AsyncIterator[Any] | None) -> AsyncIterator[Any] | None:
    """``items`` (a provider's input) counting what the provider reads: STT audio, TTS text."""
    if counts is None or items is None or stage not in ("stt", "tts"):
        return items
    return _counted_input(stage, counts, items)


async def _counted_input(stage: str, counts: Counts, items: AsyncIterator[Any]
                         ) -> AsyncIterator[Any]:
    try:
        async for item in items:
            if stage == "stt":
                counts.audio_in_s += len(item) / _STT_BYTES_PER_S
            else:
                counts.characters += len(item)
            yield item
    finally:
        await _aclose(items)


def metered_output(stage: str, counts: Counts | None, items: AsyncIterator[Any],
                   sample_rate: int = 0) -> AsyncIterator[Any]:
    """``items`` (a TTS provider's audio, s16le at ``sample_rate``) counting the seconds made."""
    if counts is None or stage != "tts" or sample_rate <= 0:
        return items
    return _counted_audio(counts, items, sample_rate)


async def _counted_audio(counts: Counts, items: AsyncIterator[Any], sample_rate: int
                         ) -> AsyncIterator[Any]:
    try:
        async for piece in items:
            counts.audio_out_s += len(piece.pcm) / (2 * sample_rate)
            yield piece
    finally:
        await _aclose(items)


async def _aclose(items: AsyncIterator[Any]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()


def report_tokens(provider: str, usage: Mapping[str, Any] | None) -> None:
    """An LLM API's token counts for the turn being metered (nothing outside one), in
    OpenAI's shape (``prompt_tokens``, ``completion_tokens``, ``prompt_tokens_details.
    cached_tokens``; Groq's and Gemini's too) or Anthropic's (``input_tokens`` without the
    cache, ``cache_read_input_tokens``, ``cache_creation_input_tokens``, ``output_tokens``)."""
    meter = _METER.get()
    tokens = tokens_of(usage or {})
    if meter is None or meter.closed or tokens is None:
        return
    counts = meter.of(provider)
    counts.input_tokens += tokens[0]
    counts.output_tokens += tokens[1]
    counts.cached_tokens += tokens[2]
    counts.token_reports += 1
    counts.measured.update(TOKENS)


def tokens_of(usage: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """(input including cached, output, cached) from an API's usage; None if it has none."""
    def count(mapping: Any, key: str) -> int:
        value = mapping.get(key) if isinstance(mapping, Mapping) else None
        return value if isinstance(value, int) and value >= 0 else 0

    if "prompt_tokens" in usage or "completion_tokens" in usage:
        cached = count(usage.get("prompt_tokens_details"), "cached_tokens")
        return count(usage, "prompt_tokens"), count(usage, "completion_tokens"), cached
    if "input_tokens" in usage or "output_tokens" in usage:
        read = count(usage, "cache_read_input_tokens")
        written = count(usage, "cache_creation_input_tokens")
        return count(usage, "input_tokens") + read + written, count(usage, "output_tokens"), read
    return None


# ---- prices ------------------------------------------------------------------------------------


class Prices:
    """USD per unit, by (stage, provider)."""

    def __init__(self, table: Mapping[tuple[str, str], Mapping[str, float]] | None = None) -> None:
        self.table = {key: dict(units) for key, units in (table or {}).items()}

    def __bool__(self) -> bool:
        return bool(self.table)

    def cost(self, stage: str, provider: str, counts: Counts) -> float | None:
        """What ``counts`` cost; None without a price for the provider, or when a priced unit
        was not measured (tokens an API did not report for every request: a turn whose
        second tool round was cut is not priced on its first round's tokens). Units without
        a price are free; cached tokens cost the input price unless they have their own."""
        prices = self.table.get((stage, provider))
        measured = counts.measured_units()
        if prices is None or any(unit not in measured for unit in prices):
            return None
        total = 0.0
        for unit, price in prices.items():
            amount: float = getattr(counts, unit)
            if unit == "input_tokens" and "cached_tokens" in prices:
                amount -= counts.cached_tokens  # priced on their own below
            elif unit == "cached_tokens" and "input_tokens" not in prices:
                continue  # no input price: the input is free, cached or not
            total += price * amount
        return round(total, 9)


def load_prices(value: str) -> Prices:
    """``VOICEBUS_PRICES``: a TOML file (``[llm.openai]`` ``input_tokens = "0.15/1M"``) or its
    entries inline (``llm.openai.input_tokens=0.15/1M,…``); empty: no prices. Raises
    ``ConfigError`` naming what is wrong."""
    value = value.strip()
    if not value:
        return Prices()
    entries: list[tuple[str, Any]] = []
    if value.endswith(".toml") or os.path.isfile(value):
        try:
            with open(value, "rb") as file:
                document = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"VOICEBUS_PRICES={value}: {exc}") from None
        for stage, providers in document.items():
            for provider, units in (providers.items() if isinstance(providers, dict) else
                                    [("", providers)]):
                for unit, price in (units.items() if isinstance(units, dict) else [("", units)]):
                    entries.append((f"{stage}.{provider}.{unit}", price))
    else:
        for item in value.replace(";", ",").split(","):
            if item.strip():
                key, _, price = item.partition("=")
                entries.append((key.strip(), price.strip()))
    table: dict[tuple[str, str], dict[str, float]] = {}
    for key, price in entries:
        stage, provider, unit = _key(key)
        table.setdefault((stage, provider), {})[unit] = _price(key, price)
    return Prices(table)


def _key(key: str) -> tuple[str, str, str]:
    parts = key.split(".")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(f"VOICEBUS_PRICES: {key!r} is not stage.provider.unit")
    stage, provider, unit = parts
    if stage not in sj.PROVIDER_STAGES:
        raise ConfigError(f"VOICEBUS_PRICES: {key!r}: the stage is one of "
                          f"{', '.join(sj.PROVIDER_STAGES)}")
    units = MEASURED[stage] | (frozenset(TOKENS) if stage == "llm" else frozenset())
    if unit not in units:
        raise ConfigError(f"VOICEBUS_PRICES: {key!r}: the {stage} stage's units are "
                          f"{', '.join(u for u in UNITS if u in units)}")
    return stage, provider, unit


def _price(key: str, value: Any) -> float:
    """A number, or "PRICE/AMOUNT" (AMOUNT: a number, with k or M, or min or h), per unit."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int | float):
            price = float(value)
        else:
            text, _, amount = str(value).partition("/")
            price = float(text)
            if amount:
                amount = amount.strip()
                suffix = next((x for x in _AMOUNTS if amount.endswith(x)), "")
                number = amount[:len(amount) - len(suffix)]
                per = (float(number) if number else 1.0) * _AMOUNTS.get(suffix, 1.0)
                if not per > 0:
                    raise ValueError
                price /= per
        if not math.isfinite(price) or price < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"VOICEBUS_PRICES: {key}={value!r}: a price is a number of USD, or "
                          "PRICE/AMOUNT such as 0.15/1M, 0.03/1k or 0.0043/min") from None
    return price


# ---- the end of a turn -------------------------------------------------------------------------


async def publish(worker: Any, meter: Meter, turn: int, *, interrupted: bool = False) -> None:
    """The turn is over for ``worker``'s stage: one ``Usage`` per provider that worked on it,
    and the counters. The meter is closed: later reports (a provider finishing late) are not
    charged to this turn."""
    meter.closed = True
    stage: str = worker.service.stage
    prices: Prices = getattr(worker.service, "prices", None) or Prices()
    for provider, counts in meter.providers.items():
        if not counts.requests:
            continue  # tokens reported without an attempt the adapter saw: not a turn's work
        cost = prices.cost(stage, provider, counts)
        units = {"requests": counts.requests, "input_tokens": counts.input_tokens,
                 "output_tokens": counts.output_tokens, "cached_tokens": counts.cached_tokens,
                 "characters": counts.characters, "audio_in_s": round(counts.audio_in_s, 3),
                 "audio_out_s": round(counts.audio_out_s, 3)}
        for unit, amount in units.items():
            if amount:
                metrics.USAGE.labels(stage, provider, unit).inc(amount)
        if cost is not None:
            metrics.COST.labels(stage, provider).inc(cost)
        # Its own seq counter (the event's docstring says why).
        event = worker.event(ev.Usage, f"{stage}.usage", stage=stage, provider=provider,
                             turn=turn, failed=counts.failed, interrupted=interrupted,
                             cost_usd=cost, **units)
        await worker.bus.publish(sj.USAGE[stage], event)
