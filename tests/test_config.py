"""Config loading: defaults, gateway inheritance, clear errors naming the file and key."""

from __future__ import annotations

import pytest

from tasks.core.config import Provider, load_settings
from tasks.core.errors import ConfigError


def test_defaults_have_an_openai_and_an_anthropic_model(monkeypatch, tmp_path):
    monkeypatch.delenv("RADFLOW_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert [m.provider for m in s.models] == [Provider.OPENAI, Provider.ANTHROPIC]
    assert s.language.value == "ko" and s.preprocess.max_edge == 1024


def test_gateway_fills_endpoint_and_key(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(
        "gateway: {base_url: 'http://relay:8080/v1', api_key_env: RELAY_KEY}\n"
        "models:\n"
        "  - {name: a, provider: openai, model: gpt-4o}\n"
        "  - {name: b, provider: anthropic, model: claude, base_url: 'http://other', api_key_env: B_KEY}\n"
    )
    monkeypatch.setenv("RELAY_KEY", "relay-secret")
    s = load_settings(path)
    a, b = s.models
    assert a.endpoint(s.gateway) == ("http://relay:8080/v1", "RELAY_KEY", None)
    assert a.api_key(s.gateway).get_secret_value() == "relay-secret"
    assert b.endpoint(s.gateway) == ("http://other", "B_KEY", None)


def test_missing_key_names_the_variable_not_a_value(tmp_path, monkeypatch):
    monkeypatch.delenv("NOPE_KEY", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("models: [{name: a, provider: openai, model: m, api_key_env: NOPE_KEY}]\n")
    s = load_settings(path)
    with pytest.raises(ConfigError, match='"NOPE_KEY"'):
        s.models[0].api_key(s.gateway)


@pytest.mark.parametrize(
    "text, match",
    [
        ("language: fr\n", "language"),
        ("models: [{name: a, provider: mistral, model: m}]\n", "provider"),
        ("preprocess: {max_edge: -1}\n", "max_edge"),
        ("modles: []\n", "modles"),
        (
            "models: [{name: a, provider: openai, model: m}, {name: a, provider: openai, model: n}]\n",
            "repeated: a",
        ),
        ("- a\n- b\n", "mapping"),
        ("models: [\n", "not valid YAML"),
    ],
)
def test_invalid_config_names_file_and_field(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_settings(path)
    assert "bad.yaml" in str(info.value)
