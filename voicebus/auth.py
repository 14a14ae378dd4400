"""Credentials for the bus: one nkey per role, and nats-server's configuration that knows only
their public halves and each role's rights (``proto/permissions.py``).

Why nkeys users in the server configuration, rather than passwords or decentralised JWT
accounts: the server holds no secret (an nkey user is its public key; the client proves it
holds the seed by signing the server's nonce), the rights live in one small file the launcher
writes, and there is no account server to run. JWT accounts pay off once several teams or
tenants share one NATS deployment; a voicebus deployment is one account.

``voicebus up`` writes development credentials into its work folder on every start
(``<workdir>/bus/``): ``nats.conf`` for its nats-server, and ``<role>.nk`` (mode 0600) for each
role. A deployment supplies its own the same way (``docs/security.md``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nkeys

from proto import permissions

SEED_SUFFIX = ".nk"


def new_seed() -> bytes:
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)


def public_key(seed: bytes) -> str:
    return nkeys.from_seed(bytearray(seed)).public_key.decode()


def _user(role: str, key: str) -> dict[str, object]:
    user: dict[str, object] = {"nkey": key}
    rights = permissions.rights(role)
    if rights is not None:
        # allow_responses: a role may answer requests made to it (nats.micro's $SRV.PING…)
        # without a right to publish on the requester's inbox in general.
        user["permissions"] = {"publish": {"allow": list(rights.publish)},
                               "subscribe": {"allow": list(rights.subscribe)},
                               "allow_responses": True}
    return user


def write_server_config(folder: Path, keys: dict[str, str], *, tls: dict[str, str] | None = None
                        ) -> Path:
    """nats-server's configuration: these users (role → public key), nobody else. JSON is
    valid nats-server configuration syntax, so it is written with ``json``."""
    config: dict[str, object] = {
        "authorization": {"users": [_user(role, key) for role, key in keys.items()]},
    }
    if tls:
        config["tls"] = tls
    path = folder / "nats.conf"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def generate(folder: Path, *, tls: dict[str, str] | None = None) -> dict[str, Path]:
    """Fresh development credentials in ``folder``: a seed file per role (0600) and
    ``nats.conf`` (with nats-server's ``tls`` block if given). Returns role → seed file."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    seeds: dict[str, Path] = {}
    keys: dict[str, str] = {}
    for role in permissions.ROLES:
        seed = new_seed()
        path = folder / f"{role}{SEED_SUFFIX}"
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(seed + b"\n")
        seeds[role], keys[role] = path, public_key(seed)
    write_server_config(folder, keys, tls=tls)
    return seeds
