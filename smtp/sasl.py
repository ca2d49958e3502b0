"""SASL PLAIN (RFC 4616), shared by the pure SMTP and POP3 dialogues.

Both protocols carry the client's responses as base64 on a line of their own
(RFC 4954 4, RFC 5034 4). PLAIN's message is `authzid NUL authcid NUL passwd`;
we let nobody act as another identity, so an authzid, if given, must be the
authcid. How each failure is answered (501 or 535 in SMTP, -ERR in POP3) is
the dialogue's business: here each has its own exception.
"""

from __future__ import annotations

import base64
import binascii

MAX_AUTH_LINE = 12288   # RFC 4954 4: a line of an AUTH exchange may be up to 12288 octets


class SaslError(Exception):
    """A SASL response that cannot be used."""


class Malformed(SaslError):
    """Not base64, or not the three NUL-separated parts of a PLAIN message."""


class OtherIdentity(SaslError):
    """An authzid other than the authcid: acting as another user (RFC 4616)."""


class NotUtf8(SaslError):
    """A user name or password that is not UTF-8."""


def decode_response(token: str) -> bytes:
    """The bytes of one base64 response; "=" is the empty response (RFC 4954 4)."""
    if token == "=":
        return b""
    try:
        return base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        raise Malformed("not base64") from None


def decode_plain(raw: bytes) -> tuple[str, str]:
    """(user, password) of a decoded PLAIN message."""
    parts = raw.split(b"\0")
    if len(parts) != 3:
        raise Malformed("not authzid NUL authcid NUL passwd")
    authzid, user, password = parts
    if authzid and authzid != user:
        raise OtherIdentity()
    try:
        return user.decode("utf-8"), password.decode("utf-8")
    except UnicodeDecodeError:
        raise NotUtf8() from None
