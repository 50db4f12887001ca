"""Credentials out of anything machinable writes down or shows.

A URL may carry a password (``https://user:pw@host``, ``postgresql://u:pw@db``), a token
as its user name (``https://TOKEN@host``) or in its query (``?token=...``,
``X-Amz-Signature=...``). ``redact`` masks those wherever they appear in a text: lock
files, CLI output, error messages and reprs go through it.
"""

from __future__ import annotations

import re

MASK = "***"

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#@\s'\"]+)@")
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;](?:[^=&;#\s'\"]*?)(?:token|key|secret|sig|signature|password|passwd|pwd|auth|credential)"
    r"[^=&;#\s'\"]*=)(?P<value>[^&;#\s'\"]+)",
    re.IGNORECASE,
)


def _userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match.group("userinfo").partition(":")
    # "user:password" keeps the user; a lone name may itself be a token, so it goes.
    shown = f"{user}:{MASK}" if colon else MASK
    return f"{match.group('scheme')}{shown}@"


def redact(text: str) -> str:
    """``text`` with URL passwords, user-name tokens and secret query values masked."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(_userinfo, text)
    return _SECRET_PARAM.sub(lambda m: f"{m.group('name')}{MASK}", text)


def has_credentials(text: str) -> bool:
    """Does ``text`` carry something ``redact`` would mask?"""
    return redact(text) != text
