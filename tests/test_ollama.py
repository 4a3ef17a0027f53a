"""Unit tests: how a push's error line from Ollama is read (the registry's status, or none)."""

from __future__ import annotations

import pytest

from entrypoint.ollama import push_error_status


@pytest.mark.parametrize("detail, status", [
    ("unauthorized: access denied", 401),
    ("401: {\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}", 401),
    ("max retries exceeded: http status 403 Forbidden: denied", 403),
    ("http status 502 Bad Gateway: <html>", 502),
    ("401", 401),  # a token server's refusal with an empty body
    # A Basic challenge (no realm) or a token server on another host: Ollama cannot authenticate there.
    ('realm host "" does not match original host "127.0.0.1:5000"', 401),
    ("Put \"http://127.0.0.1:5000/v2/a/b/blobs/uploads/x?digest=sha256%3A4015\": dial tcp: connection refused", None),
    ("max retries exceeded: EOF", None),
    # A digest's digits are never a status.
    ("blob sha256:401abc... : unexpected EOF", None),
    ("sha256:4010f3: 403a", None),
])
def test_a_push_error_names_the_registrys_status_or_none(detail, status):
    assert push_error_status(detail) == status
