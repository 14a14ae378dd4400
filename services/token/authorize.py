"""Who may have a token: an optional hook named by ``VOICEBUS_TOKEN_AUTHORIZE``.

Without a hook EVERYONE who can reach the service gets a token for any room (fine on a
laptop). Before exposing the service, set a hook or put an authenticating reverse proxy in
front of it. A hook is ``func(request, room, identity)`` (sync or async) returning something
truthy to allow; it may also raise ``fastapi.HTTPException`` to answer with its own status.
The request body has already been read when it is called: use ``room`` and ``identity``, and
the request's headers, cookies and client address.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from fastapi import Request

from services.runtime.errors import ConfigError

ENV_NAME = "VOICEBUS_TOKEN_AUTHORIZE"

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
                     identity: str) -> bool:
    if authorize is None:
        return True
    verdict = authorize(request, room, identity)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    return bool(verdict)

