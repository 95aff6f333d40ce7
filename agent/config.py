"""Agent configuration: one strict, self-documenting model.

Sources, lowest to highest priority: defaults, a YAML or TOML file (``--config``), then
``EDGEWATCH_*`` environment variables (nested with ``__``, e.g. ``EDGEWATCH_MQTT__HOST``).
Every problem becomes a :class:`ConfigError` with one line naming the field.

Relative paths are relative to the working directory (systemd ``WorkingDirectory=``).
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError


class ConfigError(Exception):
    """Bad configuration. The message is one line naming the field."""


def _state_dir_default() -> Path:
    # systemd StateDirectory= exports STATE_DIRECTORY (colon-separated when several).
    env = os.environ.get("STATE_DIRECTORY")
    return Path(env.split(":")[0]) if env else Path("state")


def _expand(p: Path | None) -> Path | None:
    # Lets a config say "$CREDENTIALS_DIRECTORY/mqtt_password" for systemd credentials.
    return None if p is None else Path(os.path.expandvars(os.path.expanduser(str(p))))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsConfig(_Section):
    enabled: bool = Field(False, description="Connect with TLS (the broker's port is then usually 8883).")
    ca_file: Path | None = Field(None, description="CA bundle that signed the broker certificate; None = system CAs.")
    cert_file: Path | None = Field(None, description="Client certificate for mutual TLS.")
    key_file: Path | None = Field(None, description="Private key of the client certificate.")
    insecure: bool = Field(False, description="Skip broker hostname verification (testing only).")

    @model_validator(mode="after")
    def _pair(self) -> "TlsConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        self.ca_file, self.cert_file, self.key_file = map(_expand, (self.ca_file, self.cert_file, self.key_file))
        return self


class MqttConfig(_Section):
    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker TCP port.")
    client_id: str | None = Field(
        None, description="MQTT client id; must be stable so the broker keeps our session. Default edgewatch-<agent_id>."
    )
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version.")
    keepalive: int = Field(30, ge=5, le=3600, description="Seconds between keep-alive pings.")
    session_expiry_s: int = Field(
        3600, ge=0, description="MQTT 5 session expiry: how long the broker queues QoS 1 telemetry while the agent is away."
    )
    reconnect_min_s: int = Field(1, ge=1, description="First reconnect delay; doubles up to reconnect_max_s.")
    reconnect_max_s: int = Field(30, ge=1, description="Longest reconnect delay.")
    alert_linger_s: float = Field(
        90.0, ge=0, le=86_400,
        description="Keep an alert this long after the broker acknowledged it, and publish it again after a "
        "reconnect within that time: a broker killed before its next autosave forgets what it acknowledged. Set it "
        "above the broker's autosave_interval; 0 = forget an alert on its PUBACK.",
    )
    receive_maximum: int | None = Field(
        None, ge=2, le=65535,
        description="Most telemetry messages the broker may send before we acknowledge them (we acknowledge once "
        "a state checkpoint holds them). MQTT 5: sent to the broker; default queue.max_messages, at most 65535. "
        "MQTT 3.1.1: the broker decides (mosquitto max_inflight_messages, default 20): set it to the broker's value.",
    )
    username: str | None = Field(None, description="Broker user name.")
    password_file: Path | None = Field(
        None, description="File holding the broker password, e.g. $CREDENTIALS_DIRECTORY/mqtt_password (never inline)."
    )
    allow_anonymous: bool | None = Field(
        None,
        description="Connecting without credentials, and to a broker that lets anyone connect without them. "
        "None (default): allowed only for a loopback broker (demo, a broker on this gateway); "
        "false: require credentials and refuse a broker that also accepts anonymous clients; true: allow.",
    )
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS settings.")

    @model_validator(mode="after")
    def _auth(self) -> "MqttConfig":
        if self.password_file is not None and not self.username:
            raise ValueError("password_file needs a username")
        if self.allow_anonymous is False and not self.username:
            raise ValueError("allow_anonymous is false but no username is set")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        self.password_file = _expand(self.password_file)
        return self

    @property
    def loopback(self) -> bool:
        """The broker is on this machine (by address or the name localhost; no DNS lookup)."""
        h = self.host.strip("[]").lower()
        if h == "localhost" or h.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(h).is_loopback
        except ValueError:
            return False

    def anonymous_allowed(self) -> bool:
        return self.allow_anonymous if self.allow_anonymous is not None else self.loopback

    def password(self) -> str | None:
        """Read the secret now (not at config load) so rotated credentials are picked up."""
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text().rstrip("\r\n")
        except OSError as e:
            raise ConfigError(f"mqtt.password_file: cannot read {self.password_file}: {e.strerror}") from None


PayloadFormat = Literal["json", "flat", "per_sensor"]


class PartitionConfig(_Section):
    index: int = Field(ge=0, description="This agent's partition, 0..count-1.")
    count: int = Field(ge=1, le=1024, description="Number of partitions (agents) the devices are spread over.")

    @model_validator(mode="after")
    def _range(self) -> "PartitionConfig":
        if self.index >= self.count:
            raise ValueError(f"index {self.index} must be < count {self.count}")
        return self


class TopicsConfig(_Section):
    telemetry: list[str] = Field(
        default_factory=lambda: ["factory/+/{device}/telemetry"],
        min_length=1,
        description="Topic patterns to subscribe to; {device} names the device level "
        "({sensor} too for per_sensor), + and # are MQTT wildcards.",
    )
    format: PayloadFormat = Field(
        "json",
        description='json: {"ts":..,"values":{"s":1.0}}; flat: {"ts":..,"s":1.0}; per_sensor: one topic per sensor, '
        'payload a bare number (or {"ts":..,"value":..}).',
    )
    alerts: str = Field("edgewatch/alerts/{device}", description="Alert topic (QoS 1), with {device}.")
    state: str = Field("edgewatch/state/{device}", description="Retained current-state topic, with {device}.")
    status: str = Field("edgewatch/status/{agent_id}", description="Retained online/offline topic, with {agent_id}.")
    model: str = Field(
        "edgewatch/status/{agent_id}/model",
        description="Retained JSON naming the bundle in service (name, version, backend, loaded_at), with {agent_id}.",
    )
    dead_letter: str | None = Field(None, description="If set, invalid payloads are republished here (QoS 0) with a reason.")
    partition: PartitionConfig | None = Field(
        None,
        description="Scale-out: score only the devices of one partition (crc32(device) % count == index); "
        "the others are dropped (counted as other_partition). With {partition} in the telemetry patterns the "
        "agent subscribes to its own partition only, so the broker routes each device to one agent.",
    )

    @model_validator(mode="after")
    def _placeholders(self) -> "TopicsConfig":
        for p in self.telemetry:
            if p.count("{device}") != 1:
                raise ValueError(f"telemetry pattern {p!r} needs exactly one {{device}}")
            if (self.format == "per_sensor") != ("{sensor}" in p):
                raise ValueError(f"telemetry pattern {p!r}: {{sensor}} is required by, and only by, format per_sensor")
            if p.count("{partition}") > 1 or ("{partition}" in p and self.partition is None):
                raise ValueError(f"telemetry pattern {p!r}: {{partition}} appears at most once, and needs topics.partition")
        for name in ("alerts", "state"):
            t = getattr(self, name)
            if "{device}" not in t or "+" in t or "#" in t:
                raise ValueError(f"{name} topic {t!r} needs {{device}} and no wildcards")
        for name in ("status", "model"):
            if "+" in getattr(self, name) or "#" in getattr(self, name):
                raise ValueError(f"{name} topic cannot contain wildcards")
        return self


class BatchingConfig(_Section):
    max_batch: int = Field(64, ge=1, le=4096, description="Most windows scored in one inference call.")
    max_latency_ms: float = Field(2.0, ge=0, le=10_000, description="Longest a window waits for its batch to fill, counted from its message's arrival (queueing included). 2 ms halves the median publish-to-alert time against 5 (bench/README.md); a backlog still fills whole batches.")


class QueueConfig(_Section):
    max_messages: int = Field(
        10_000, ge=1,
        description="Received messages buffered for the pipeline; when full the network thread waits for room "
        "(the broker keeps the rest queued), and drops (counted as queue_full) after full_wait_ms without room.",
    )
    full_wait_ms: float = Field(
        1000.0, ge=0, le=60_000,
        description="How long a full queue may hold the network thread before a message is dropped: backpressure "
        "for a backlog, a bound for a wedged pipeline (keep it well under mqtt.keepalive).",
    )
    max_bytes: int = Field(
        64 * 1024 * 1024, ge=65_536,
        description="Payload bytes buffered for the pipeline; beyond, new messages are dropped (counted as queue_full).",
    )


class MetricsConfig(_Section):
    enabled: bool = Field(True, description="Serve /metrics, /healthz and /readyz over HTTP.")
    host: str = Field("127.0.0.1", description="Bind address (0.0.0.0 to let a remote Prometheus scrape).")
    port: int = Field(9108, ge=0, le=65535, description="HTTP port (0 = any free port).")


class SelftestConfig(_Section):
    interval_s: float = Field(
        0.0, ge=0, le=7 * 86400,
        description="Run the synthetic-fault canary (edge-agent selftest) this often while serving; 0 = off. "
        "Needs a bundle with a generator (edge-trainer fit --fault-col). Never raises real alerts.",
    )
    per_class: int = Field(20, ge=1, le=1000, description="Synthetic windows per fault type.")
    min_detected: float = Field(
        0.5, ge=0, le=1,
        description="Pass when every fault type is detected in at least this fraction of its synthetic windows.",
    )
    topic: str = Field("edgewatch/status/{agent_id}/selftest", description="Retained canary result (JSON), with {agent_id}.")

    @field_validator("topic")
    @classmethod
    def _no_wildcards(cls, v: str) -> str:
        if not v or "+" in v or "#" in v:
            raise ValueError("selftest topic must be non-empty without wildcards")
        return v


class LogConfig(_Section):
    format: Literal["text", "json"] = Field("text", description="text for journald/humans, json for log shippers.")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class AgentConfig(BaseSettings):
    """Everything the agent reads at start-up."""

    model_config = SettingsConfigDict(env_prefix="EDGEWATCH_", env_nested_delimiter="__", extra="forbid")

    agent_id: str = Field(default_factory=socket.gethostname, description="This gateway's name in topics and alerts.")
    bundle: Path = Field(
        Path("bundle"),
        description="Bundle directory (manifest.json and model files); in production a symlink into bundles/ "
        "next to it, switched by `edge-agent install-bundle` and `edge-agent rollback`.",
    )
    bundle_watch_s: float = Field(
        5.0, ge=0, le=3600,
        description="Check the bundle (symlink target, manifest and files) this often and hot-reload it when it "
        "changes; 0 = only on SIGHUP.",
    )
    backend: Literal["onnxruntime", "litert"] = Field("onnxruntime", description="Inference runtime.")
    threads: int = Field(1, ge=1, le=64, description="Inference threads (1 suits small models on a shared gateway).")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="Broker connection.")
    topics: TopicsConfig = Field(default_factory=TopicsConfig, description="Topics in and out.")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Micro-batching across devices.")
    queue: QueueConfig = Field(default_factory=QueueConfig, description="Hand-off queue from the network thread.")
    max_devices: int = Field(10_000, ge=1, description="Most devices tracked; messages from further devices are dropped (counted).")
    max_payload_bytes: int = Field(65_536, ge=16, description="Larger payloads are rejected as too_large.")
    state_dir: Path = Field(default_factory=_state_dir_default, description="Where the alert outbox lives ($STATE_DIRECTORY under systemd).")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="HTTP metrics and health endpoints.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")
    selftest: SelftestConfig = Field(default_factory=SelftestConfig, description="Synthetic-fault commissioning check and canary.")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # Environment beats the file (passed as init kwargs); pydantic-settings deep-merges nested sections.
        return (env_settings, init_settings)

    @field_validator("agent_id")
    @classmethod
    def _topic_safe(cls, v: str) -> str:
        if not v or any(c in v for c in "/+#"):
            raise ValueError("must be non-empty without / + #")
        return v

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edgewatch-{self.agent_id}"

    @property
    def status_topic(self) -> str:
        return self.topics.status.replace("{agent_id}", self.agent_id)

    @property
    def model_topic(self) -> str:
        return self.topics.model.replace("{agent_id}", self.agent_id)

    @property
    def selftest_topic(self) -> str:
        return self.selftest.topic.replace("{agent_id}", self.agent_id)


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return data


def load_config(path: str | Path | None = None, **overrides: Any) -> AgentConfig:
    """File (optional) + environment (+ explicit overrides, for tests) → validated config."""
    data = read_config_file(path) if path else {}
    data.update(overrides)
    try:
        return AgentConfig(**data)
    except ValidationError as e:
        raise ConfigError(_one_line(e, path)) from None
    except SettingsError as e:  # an EDGEWATCH_* variable that is not valid JSON for a list/section
        raise ConfigError(f"config: {e} (lists and sections in the environment are JSON, e.g. '[\"a/{{device}}\"]')") from None


def _one_line(e: ValidationError, path: str | Path | None) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    where = f" (in {path} or EDGEWATCH_{loc.upper().replace('.', '__')})" if path else f" (EDGEWATCH_{loc.upper().replace('.', '__')})"
    extra = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
    got = err.get("input")
    shown = f", got {got!r}" if err["type"] != "missing" and not isinstance(got, (dict, list)) and got is not None else ""
    return f"config {loc}: {msg}{shown}{where}{extra}"
