"""Agent profiles: the file's checks, and each stage's settings for an agent."""

from __future__ import annotations

import pytest

from services.egress.service import EgressConfig
from services.ingress.service import IngressConfig
from services.llm.config import LlmConfig
from services.runtime import agents
from services.runtime.errors import ConfigError
from services.stt.config import SttConfig
from services.tts.config import TtsConfig


def test_the_built_in_file_has_the_default_demo_and_meeting_agents() -> None:
    known = agents.load(str(agents.BUILT_IN))
    assert list(known) == ["default", "demo", "meeting"]
    demo = known["demo"]
    assert demo.tools == ("get_time", "get_balance", "end_call") and demo.greeting
    config = agents.stage_config(LlmConfig(llm_provider="echo"), demo, "llm", "demo")
    assert config.llm_provider == "demo"
    meeting = known["meeting"]
    heard = agents.stage_config(IngressConfig(), meeting, "ingress", "meeting")
    judged = agents.stage_config(EgressConfig(), meeting, "egress", "meeting")
    assert heard.listen == "everyone"
    assert (judged.answer, judged.agent_name) == ("addressed", "Nova, computer")


def test_a_stage_gets_the_agents_own_settings_and_keeps_the_rest() -> None:
    parsed = agents.parse('[agents.bank.tts]\npiper_voice = "/voices/alba.onnx"\n'
                          'piper_length_scale = 1.2\n')
    base = TtsConfig(tts_provider="piper")
    config = agents.stage_config(base, parsed["bank"], "tts", "bank")
    assert (config.piper_voice, config.piper_length_scale, config.tts_provider) == (
        "/voices/alba.onnx", 1.2, "piper")
    # Another stage, or an agent without settings, keeps the stage's own object.
    assert agents.stage_config(base, parsed["default"], "tts", "default") is base


@pytest.mark.parametrize("text, says", [
    ('[agents.x.llm]\nno_such = 1\n', "has no such setting"),
    ('[agents.x.llm]\nopenai_api_key = "sk-1"\n', "not a setting an agent may change"),
    ('[agents.x.llm]\nnats_url = "nats://elsewhere"\n', "not a setting an agent may change"),
    ('[agents.x.llm]\nllm_timeout = "soon"\n', "agent 'x', [llm]"),
])
def test_a_setting_an_agent_may_not_have_stops_the_stage(text: str, says: str) -> None:
    parsed = agents.parse(text)
    with pytest.raises(ConfigError, match=says.replace("[", r"\[").replace("]", r"\]")):
        agents.stage_config(LlmConfig(), parsed["x"], "llm", "x")


@pytest.mark.parametrize("text, says", [
    ("[agents.x]\ntool = ['a']\n", "unknown field `tool`"),
    ("[agents.x]\ntools = ['no spaces']\n", "tools"),
    ("[agents.'a b']\n", "agent name 'a b'"),
    ("[agents.x\n", "not TOML"),
])
def test_a_malformed_file_is_refused_naming_the_fault(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        agents.parse(text, "agents.toml")


def test_an_unknown_agent_gets_the_default(tmp_path) -> None:
    path = tmp_path / "a.toml"
    path.write_text("[agents.bank]\ngreeting = 'Hi'\n")
    known = agents.load(str(path))
    assert "bank" in known and "" in known and "nope" not in known
    assert known.get_or_default("nope") == known["default"] == agents.Agent()
    with pytest.raises(ConfigError, match="cannot read"):
        agents.load(str(tmp_path / "missing.toml"))


def test_language_sets_each_stages_language_settings_in_their_spelling() -> None:
    parsed = agents.parse('[agents.hi]\nlanguage = "hi-IN"\n')
    stt = agents.stage_config(SttConfig(), parsed["hi"], "stt", "hi")
    assert (stt.stt_language, stt.sarvam_stt_language) == ("hi-in", "hi-IN")
    tts = agents.stage_config(TtsConfig(), parsed["hi"], "tts", "hi")
    assert (tts.sarvam_tts_language, tts.cartesia_tts_language) == ("hi-IN", "hi")
    assert tts.elevenlabs_tts_language == ""  # refused by most of its models: the agent's to set
    llm = LlmConfig()
    assert agents.stage_config(llm, parsed["hi"], "llm", "hi") is llm  # no language there


def test_a_stage_table_overrides_the_agents_language_setting_by_setting() -> None:
    parsed = agents.parse('[agents.x]\nlanguage = "ta-in"\n'
                          '[agents.x.stt]\nstt_language = "en-us"\n')
    stt = agents.stage_config(SttConfig(), parsed["x"], "stt", "x")
    assert (stt.stt_language, stt.sarvam_stt_language) == ("en-us", "ta-IN")


def test_an_agent_chooses_its_cloud_voices() -> None:
    parsed = agents.parse('[agents.x.tts]\nelevenlabs_tts_voice = "EXAVITQu4vr4xnSDxMaL"\n'
                          'elevenlabs_tts_speed = 1.1\ncartesia_tts_voice = "a0e99841"\n')
    tts = agents.stage_config(TtsConfig(), parsed["x"], "tts", "x")
    assert (tts.elevenlabs_tts_voice, tts.elevenlabs_tts_speed, tts.cartesia_tts_voice) == \
        ("EXAVITQu4vr4xnSDxMaL", 1.1, "a0e99841")
    assert TtsConfig().elevenlabs_tts_voice == "JBFqnCBsd6RMkjVDRZzb"  # the default's unchanged


@pytest.mark.parametrize("value", ["Hindi", "hi_IN", "h-IN", "hi-", "hi IN"])
def test_a_language_that_is_not_a_bcp47_tag_stops_the_start(value: str) -> None:
    with pytest.raises(ConfigError, match=f"agent 'x': language '{value}' is not a BCP-47 tag"):
        agents.parse(f'[agents.x]\nlanguage = "{value}"\n', "agents.toml")
