"""The bus credentials `voicebus credentials` and `voicebus up` write, and the deployment that
uses them: seeds private to their owner, a server configuration with public keys only, and a
compose file that publishes no NATS port and hands each service its own seed alone."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import nkeys
import yaml

from proto.permissions import OPERATOR, ROLES, rights
from voicebus import auth
from voicebus.launcher import ROOT


def test_each_role_gets_a_private_seed_and_the_server_only_public_keys(tmp_path) -> None:
    seeds = auth.generate(tmp_path / "bus")
    assert set(seeds) == set(ROLES)
    config = json.loads((tmp_path / "bus" / "nats.conf").read_text())
    users = config["authorization"]["users"]
    keys = {auth.public_key(path.read_bytes().strip()): role for role, path in seeds.items()}
    assert {user["nkey"] for user in users} == set(keys)  # one user per role, nobody else
    for path in seeds.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert nkeys.from_seed(bytearray(path.read_bytes().strip())).public_key
    text = (tmp_path / "bus" / "nats.conf").read_text()
    assert not any(path.read_bytes().strip().decode() in text for path in seeds.values())
    for user in users:
        role = keys[user["nkey"]]
        expected = rights(role)
        if role == OPERATOR:
            assert "permissions" not in user
        else:
            assert expected is not None
            assert user["permissions"]["publish"]["allow"] == list(expected.publish)
            assert user["permissions"]["subscribe"]["allow"] == list(expected.subscribe)
    # New keys every time: two deployments never share one.
    again = auth.generate(tmp_path / "other")
    assert again["stt"].read_bytes() != seeds["stt"].read_bytes()


def test_compose_publishes_no_nats_port_and_gives_each_service_its_own_seed() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert "ports" not in services["nats"]
    assert "/etc/nats/nats.conf" in " ".join(services["nats"]["command"])
    for role in ("ingress", "stt", "llm", "tts", "egress", "token", "sip"):
        service = services[role]
        assert service["secrets"] == [f"{role}_nkey"], role
        assert service["environment"]["VOICEBUS_NATS_NKEY_FILE"] == f"/run/secrets/{role}_nkey"
        assert "VOICEBUS_AUDIO_DIR" not in service["environment"], role
        assert compose["secrets"][f"{role}_nkey"]["file"] == f"./bus/{role}.nk"
    # A volume in the short form ("src:dst:ro") or the long one ({source: …, target: …}).
    sources = [v["source"] if isinstance(v, dict) else v.split(":")[0]
               for s in services.values() for v in s.get("volumes", [])]
    assert not any(Path(source).name == "operator.nk" for source in sources)
