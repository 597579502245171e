"""API keys: `Authorization: Bearer <key>` checks for the management, inference and metrics endpoints.

Rules (also in SECURITY.md):

* 401 + ``WWW-Authenticate: Bearer``: no credentials, or credentials that cannot be a key at all
  (another scheme, an empty or malformed token, one shorter than any accepted key).
* 403: a well-formed token that is not a key accepted here (RFC 9110: the credentials were
  understood and are insufficient), or an endpoint disabled because its key is not configured.
* Keys are compared with `hmac.compare_digest` against every accepted key (no early exit), so the
  time taken says nothing about how much of a key matched; keys and tokens are never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from pydantic import SecretStr
from starlette.requests import HTTPConnection

from server.errors import ForbiddenError, UnauthorizedError
from server.settings import BEARER_TOKEN, MIN_KEY_LENGTH


def bearer_token(connection: HTTPConnection) -> str:
    """The token of a well-formed ``Authorization: Bearer <token>`` header.

    Raises:
        UnauthorizedError: The header is missing, uses another scheme or holds no valid token.
    """
    header = connection.headers.get("authorization")
    if header is None:
        raise UnauthorizedError("missing API key: send Authorization: Bearer <key>")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or len(token) < MIN_KEY_LENGTH or not BEARER_TOKEN.fullmatch(token):
        raise UnauthorizedError("malformed Authorization header: send Authorization: Bearer <key>")
    return token


def matches_any(token: str, keys: Iterable[SecretStr]) -> bool:
    """Whether `token` equals one of `keys`, comparing against all of them in constant time."""
    given = token.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.get_secret_value().encode())
    return found


def check_key(connection: HTTPConnection, keys: list[SecretStr | None], disabled: str | None = None) -> None:
    """Require a Bearer token equal to one of the configured `keys`.

    Args:
        connection: The request.
        keys: Keys accepted here; unset ones (None) are skipped.
        disabled: When no key is configured: the 403 message (the endpoint is then disabled);
            None means the endpoint is open.

    Raises:
        UnauthorizedError: Missing or malformed credentials (401).
        ForbiddenError: Wrong key, or the endpoint is disabled (403).
    """
    configured = [k for k in keys if k is not None]
    if not configured:
        if disabled is not None:
            raise ForbiddenError(disabled)
        return
    if not matches_any(bearer_token(connection), configured):
        raise ForbiddenError("this API key is not accepted here")
