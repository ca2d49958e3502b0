"""SASL PLAIN decoding (smtp/sasl.py), shared by the SMTP and POP3 dialogues."""

import base64

import pytest

from smtp import sasl


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize("raw, want", [
    (b"\0alice\0secret pw", ("alice", "secret pw")),
    (b"alice\0alice\0pw", ("alice", "pw")),                  # authzid = authcid is fine
    ("\0jos\u00e9\0p\u00e4ss".encode(), ("jos\u00e9", "p\u00e4ss")),
])
def test_plain_decodes(raw, want):
    assert sasl.decode_plain(sasl.decode_response(b64(raw))) == want


@pytest.mark.parametrize("token, error", [
    ("not base64!", sasl.Malformed),
    ("=", sasl.Malformed),                                    # the empty response: no parts
    (b64(b"alice\0pw"), sasl.Malformed),
    (b64(b"\0a\0b\0c"), sasl.Malformed),
    (b64(b"bob\0alice\0pw"), sasl.OtherIdentity),             # RFC 4616: acting as another user
    (b64(b"\0\xff\0pw"), sasl.NotUtf8),
])
def test_plain_refuses(token, error):
    with pytest.raises(error):
        sasl.decode_plain(sasl.decode_response(token))


def test_empty_response_is_allowed_as_a_response():
    assert sasl.decode_response("=") == b""
