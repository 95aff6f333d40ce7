"""Config: file + env overrides, strictness, one-line errors naming the field."""
from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, ConfigError, load_config


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("EDGEWATCH_") or k == "STATE_DIRECTORY":
            monkeypatch.delenv(k)


def test_defaults():
    c = load_config()
    assert c.mqtt.host == "127.0.0.1" and c.mqtt.port == 1883 and c.mqtt.protocol == "5"
    assert c.topics.telemetry == ["factory/+/{device}/telemetry"]
    assert c.topics.alerts == "edgewatch/alerts/{device}" and c.topics.format == "json"
    assert c.batching.max_batch == 64 and c.batching.max_latency_ms == 2
    assert c.queue.max_messages == 10000 and c.max_devices == 10000
    assert c.metrics.port == 9108 and c.metrics.host == "127.0.0.1"
    assert c.state_dir == Path("state") and c.backend == "onnxruntime" and c.threads == 1
    assert c.client_id == f"edgewatch-{c.agent_id}"
    assert c.status_topic == f"edgewatch/status/{c.agent_id}"


def test_every_field_has_a_description():
    def walk(model):
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(AgentConfig)


def test_yaml_file_and_env_override(tmp_path, monkeypatch):
    f = tmp_path / "agent.yaml"
    f.write_text("agent_id: gw-7\nmqtt:\n  host: broker.local\n  port: 1884\nbatching:\n  max_batch: 16\n")
    monkeypatch.setenv("EDGEWATCH_MQTT__HOST", "10.0.0.5")
    monkeypatch.setenv("EDGEWATCH_LOG__LEVEL", "debug")
    c = load_config(f)
    assert c.agent_id == "gw-7"
    assert c.mqtt.host == "10.0.0.5"  # env beats file
    assert c.mqtt.port == 1884  # the rest of the section is kept (deep merge)
    assert c.batching.max_batch == 16 and c.log.level == "DEBUG"


def test_toml_file(tmp_path):
    f = tmp_path / "agent.toml"
    f.write_text('agent_id = "gw-t"\n[topics]\ntelemetry = ["plant/{device}/{sensor}"]\nformat = "per_sensor"\n')
    c = load_config(f)
    assert c.topics.format == "per_sensor" and c.agent_id == "gw-t"


def test_state_directory_from_systemd(monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/edgewatch:/var/lib/other")
    assert load_config().state_dir == Path("/var/lib/edgewatch")


def test_password_file_expands_credentials_directory(tmp_path, monkeypatch):
    (tmp_path / "mqtt_password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    c = load_config(mqtt={"username": "agent", "password_file": "$CREDENTIALS_DIRECTORY/mqtt_password"})
    assert c.mqtt.password() == "s3cret"
    c = load_config(mqtt={"username": "agent", "password_file": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="mqtt.password_file"):
        c.mqtt.password()


@pytest.mark.parametrize("env,data,needle", [
    ({"EDGEWATCH_MQTT__PORT": "abc"}, {}, "mqtt.port"),
    ({"EDGEWATCH_MQTT__PORT": "70000"}, {}, "mqtt.port"),
    ({"EDGEWATCH_MQTT__HOTS": "x"}, {}, "mqtt.hots"),
    ({}, {"bakend": "onnxruntime"}, "bakend"),
    ({}, {"backend": "tensorrt"}, "backend"),
    ({}, {"mqtt": {"password_file": "/x"}}, "password_file needs a username"),
    ({}, {"mqtt": {"allow_anonymous": False}}, "allow_anonymous"),
    ({}, {"mqtt": {"tls": {"cert_file": "/c.pem"}}}, "cert_file and key_file"),
    ({}, {"topics": {"telemetry": ["factory/+/telemetry"]}}, "{device}"),
    ({}, {"topics": {"format": "per_sensor"}}, "{sensor}"),
    ({}, {"topics": {"alerts": "edgewatch/alerts/#"}}, "alerts"),
    ({}, {"agent_id": "a/b"}, "agent_id"),
    ({}, {"batching": {"max_batch": 0}}, "batching.max_batch"),
])
def test_bad_values_are_one_line_naming_the_field(monkeypatch, env, data, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as e:
        load_config(**data)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_env_list_must_be_json(monkeypatch):
    monkeypatch.setenv("EDGEWATCH_TOPICS__TELEMETRY", "plant/{device}")
    with pytest.raises(ConfigError, match="topics"):
        load_config()
    monkeypatch.setenv("EDGEWATCH_TOPICS__TELEMETRY", '["plant/{device}"]')
    assert load_config().topics.telemetry == ["plant/{device}"]


@pytest.mark.parametrize("text,suffix", [("a: [1,\n", ".yaml"), ("a = ", ".toml"), ("- 1\n- 2\n", ".yaml")])
def test_bad_files(tmp_path, text, suffix):
    f = tmp_path / f"c{suffix}"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config("/nonexistent/agent.yaml")
