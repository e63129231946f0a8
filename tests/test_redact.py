"""The one redacting function, what it masks and what it spares, and masks undone in process only."""

from __future__ import annotations

import pytest

from synth import redact as r
from synth.teachers.openai_api import client_url


@pytest.mark.parametrize(
    "text, secret",
    [
        ("openai:m@https://user:hunter2@api.example.com/v1", "hunter2"),
        ("https://only-a-token@host/v1", "only-a-token"),
        ("http://h/v1?api_key=abc123&x=1", "abc123"),
        ("http://h/v1?x=1&token=tok456", "tok456"),
        ("http://h/v1?sig=s1g&X-Amz-Signature=deadbeef", "deadbeef"),
        ("error: Authorization: Bearer abcdefgh12345678", "abcdefgh12345678"),
        ("key sk-proj-AbCdEf0123456789xyz leaked", "sk-proj-AbCdEf0123456789xyz"),
        ("hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEf", "hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEf"),
    ],
)
def test_redact_masks_credentials(text, secret):
    assert secret not in r.redact(text) and r.MASK in r.redact(text)


@pytest.mark.parametrize("text", ["openai:gpt-4o@https://api.openai.com/v1", "https://hf-mirror-internal-host.example/v1", "hf:/models/rk-llama-finetune-base", ""])
def test_redact_spares_names_that_are_not_secrets(text):
    assert r.redact(text) == text


def test_remember_masks_and_unmask_gives_back_only_what_this_process_masked(monkeypatch):
    monkeypatch.setattr(r, "_REAL", {})
    real = "http://u:pw@h:1/v1?api_key=k"
    masked = r.remember(real)
    assert masked == "http://***@h:1/v1?api_key=***"
    assert r.unmask(masked) == real
    assert r.unmask("http://h:1/v1") == "http://h:1/v1", "nothing masked: itself"
    assert r.unmask("http://***@other:1/v1") is None, "a mask this process did not make cannot be undone"


def test_redact_data_masks_every_string_in_nested_settings():
    data = {"judge": ["openai:j@http://a:b@h/v1"], "n": 2, "inner": {"student": "http://h/v1?token=t0k"}}
    assert r.redact_data(data) == {"judge": ["openai:j@http://***@h/v1"], "n": 2, "inner": {"student": "http://h/v1?token=***"}}


def test_a_query_in_the_base_url_goes_to_the_clients_default_query():
    assert client_url("http://u:p@h:8/v1/?api_key=k&api-version=2024") == ("http://u:p@h:8/v1/", {"api_key": "k", "api-version": "2024"})
    assert client_url("https://api.openai.com/v1") == ("https://api.openai.com/v1", {})
