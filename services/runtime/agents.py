"""Agent profiles: who the agent is for a session (docs/tools.md, "Agent profiles").

One TOML file names the agents (``VOICEBUS_AGENTS``; the built-in ``agents.toml`` beside this
module when unset). The token service checks a client's choice against it; the choice travels
on ``SessionStart.agent``; each stage reads its part of the profile from the same file. A
malformed file stops a service at start, with the key at fault named: an agent silently
missing would answer every caller with the default.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec

from services.runtime.config import BaseConfig
from services.runtime.errors import ConfigError

C = TypeVar("C", bound=BaseConfig)
Setting = str | int | float | bool
STAGES = ("ingress", "stt", "llm", "tts", "egress")
# What every service shares (the bus, logs, metrics, leases): the process's, not an agent's.
_SHARED = frozenset(field.name for field in msgspec.structs.fields(BaseConfig))

ENV_NAME = "VOICEBUS_AGENTS"
BUILT_IN = Path(__file__).with_name("agents.toml")
DEFAULT = "default"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
BUILT_IN_TOOLS = frozenset({"end_call"})
# An agent's ``language``: a BCP-47 tag (language, then optional subtags such as the region).
LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*\Z")


def _region_upper(tag: str) -> str:
    primary, _, rest = tag.partition("-")
    return f"{primary.lower()}-{rest.upper()}" if len(rest) == 2 else tag


def _primary(tag: str) -> str:
    return tag.partition("-")[0].lower()


# What ``language`` sets in each stage, each in the spelling its provider reads: "hi-IN" is
# stt_language "hi-in" (read by pocketsphinx, whisper, deepgram and openai, like its default
# "en-us"), the Sarvam settings "hi-IN" and Cartesia's "hi". A setting the stage does not have
# is left out; one the agent's table for the stage sets itself wins. (ElevenLabs' language is
# left to the agent's [tts] table: its API refuses a language for models other than flash and
# turbo v2.5, and without one the model follows the text.)
LANGUAGE_SETTINGS: dict[str, dict[str, Callable[[str], str]]] = {
    "stt": {"stt_language": str.lower, "sarvam_stt_language": _region_upper},
    "tts": {"sarvam_tts_language": _region_upper, "cartesia_tts_language": _primary},
}


class Agent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    description: str = ""
    instructions: str = ""
    greeting: str = ""
    tools: tuple[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")], ...] = ()
    filler: str = "One moment."
    filler_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 1500
    # The language spoken with this agent ("hi-IN"): sets the language settings of the stages
    # that have one (LANGUAGE_SETTINGS), unless the stage's table below sets them itself.
    language: str = ""
    # Each stage's own settings for this agent's sessions, by the names of its environment
    # variables without VOICEBUS_ (llm_provider, piper_voice, stt_eot_question_ms…).
    ingress: dict[str, Setting] = {}
    stt: dict[str, Setting] = {}
    llm: dict[str, Setting] = {}
    tts: dict[str, Setting] = {}
    egress: dict[str, Setting] = {}

    def settings(self, stage: str) -> dict[str, Setting]:
        return getattr(self, stage) if stage in STAGES else {}


class _File(msgspec.Struct, forbid_unknown_fields=True):
    agents: dict[str, Agent] = {}


class Agents(Mapping[str, Agent]):
    """The agents of one file, by name; ``default`` is always there (plain, if not written)."""

    def __init__(self, agents: dict[str, Agent], source: str = "") -> None:
        self._agents = {DEFAULT: Agent(), **agents}
        self.source = source

    def __getitem__(self, name: str) -> Agent:
        return self._agents[name or DEFAULT]

    def __iter__(self):
        return iter(self._agents)

    def __len__(self) -> int:
        return len(self._agents)

    def __contains__(self, name: object) -> bool:
        return name == "" or name in self._agents

    def get_or_default(self, name: str) -> Agent:
        """The agent of a session: an unknown name (a start from a forged or stale client; the
        token service refuses those) gets the default rather than no answer."""
        return self._agents.get(name or DEFAULT, self._agents[DEFAULT])


def parse(text: str, source: str = "<text>") -> Agents:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not TOML: {exc}") from None
    try:
        parsed = msgspec.convert(raw, _File)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    for name, agent in parsed.agents.items():
        if not NAME.match(name):
            raise ConfigError(f"{source}: agent name {name!r}: 1-64 letters, digits, _ or -")
        if agent.language and not LANGUAGE.match(agent.language):
            raise ConfigError(f"{source}: agent {name!r}: language {agent.language!r} is not "
                              'a BCP-47 tag such as "hi-IN", "ta-IN" or "en-US"')
    return Agents(parsed.agents, source)


def stage_config(base: C, agent: Agent, stage: str, name: str) -> C:
    """``base`` (the stage's settings from its environment) with the agent's own for
    ``stage``. Only the stage's own settings may differ per agent: not a secret, and nothing
    every service shares (bus, logs, metrics). The agent's ``language`` comes first, so the
    stage's table overrides it setting by setting."""
    settings = {**_language_settings(base, agent, stage), **agent.settings(stage)}
    if not settings:
        return base
    known = {field.name for field in msgspec.structs.fields(type(base))}
    for key in settings:
        where = f"agent {name!r}, [{stage}] {key}"
        if key not in known:
            raise ConfigError(f"{where}: the {stage} stage has no such setting")
        if key in _SHARED or key in type(base).SECRETS:
            raise ConfigError(f"{where}: not a setting an agent may change (a secret, or one "
                              "every service shares)")
    raw: dict[str, Any] = {**msgspec.structs.asdict(base), **settings}
    try:
        return msgspec.convert(raw, type(base), strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"agent {name!r}, [{stage}]: {exc}") from None


def _language_settings(base: BaseConfig, agent: Agent, stage: str) -> dict[str, Setting]:
    if not agent.language:
        return {}
    known = {field.name for field in msgspec.structs.fields(type(base))}
    return {key: spell(agent.language)
            for key, spell in LANGUAGE_SETTINGS.get(stage, {}).items() if key in known}


def load(path: str | None = None) -> Agents:
    """The agents file at ``path``, or ``VOICEBUS_AGENTS``, or the built-in one."""
    path = path or os.environ.get(ENV_NAME) or str(BUILT_IN)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{ENV_NAME}={path}: cannot read it ({exc.strerror})") from None
    return parse(text, path)
