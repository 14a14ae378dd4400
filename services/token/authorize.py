"""Who may have a token: an optional hook named by ``VOICEBUS_TOKEN_AUTHORIZE``.

Without a hook EVERYONE who can reach the service gets a token for any room (fine on a
laptop). Before exposing the service, set a hook or put an authenticating reverse proxy in
front of it. A hook is ``func(request, room, identity)`` (sync or async) returning something
truthy to allow; it may also raise ``fastapi.HTTPException`` to answer with its own status.
The request body has already been read when it is called: use ``room`` and ``identity``, and
the request's headers, cookies and client address.

The same hook guards the session pages (``VOICEBUS_SESSION_PAGES``), which show what was said
in a recorded session: it is asked with the session id as ``room`` and an EMPTY ``identity``
(``room`` is empty too for the list of sessions). Nobody joins a room with an empty identity,
so a hook tells the two apart by it: a hook that lets every signed-in user join any room must
not let them all read every conversation.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Request

from services.runtime.errors import ConfigError

ENV_NAME = "VOICEBUS_TOKEN_AUTHORIZE"

log = logging.getLogger("voicebus.token")

Authorizer = Callable[[Request, str, str], Any]


def load_authorizer(target: str) -> Authorizer | None:
    """Import ``"package.module:function"`` (None for an empty target); ``ConfigError`` if it
    cannot be used, so a typo fails at start-up rather than letting everyone in or no one."""
    if not target:
        return None
    module_name, sep, func_name = target.partition(":")
    if not (module_name and sep and func_name):
        raise ConfigError(f"{ENV_NAME}={target!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself failing as it loads
        raise ConfigError(f"{ENV_NAME}={target!r}: cannot import {module_name!r} "
                          f"({type(exc).__name__}: {exc})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"{ENV_NAME}={target!r}: {module_name} has no function {func_name!r}")
    return func


async def is_allowed(authorize: Authorizer | None, request: Request, room: str,
                     identity: str) -> Any:
    """The hook's answer (truthy: allowed); True without a hook."""
    if authorize is None:
        return True
    verdict = authorize(request, room, identity)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    return verdict


async def require(authorize: Authorizer | None, request: Request, room: str, identity: str,
                  refusal: str) -> str:
    """Ask the hook; 403 with ``refusal`` when it says no. A hook that fails is a 500 (and a
    logged traceback), never a yes. A hook that allows with a dict holding ``instructions``
    (text) gives this session's agent those instructions too (the caller's name, their
    account…): they are returned."""
    try:
        allowed = await is_allowed(authorize, request, room, identity)
    except HTTPException:
        raise
    except Exception:
        log.exception("the authorisation hook failed", extra={"stage": "token"})
        raise HTTPException(500, "authorisation failed") from None
    if not allowed:
        raise HTTPException(403, refusal)
    if isinstance(allowed, dict) and isinstance(allowed.get("instructions"), str):
        return allowed["instructions"][:16384]
    return ""
