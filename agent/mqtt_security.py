"""Broker security policy and connection diagnostics: who may connect anonymously, readable TLS errors,
and a one-shot connection attempt for ``edge-agent check`` and the anonymous-broker test.

Policy (``mqtt.allow_anonymous``):
- ``None`` (default): anonymity is allowed only for a loopback broker. A broker on the gateway
  itself is reachable only by local processes, which is what the demo and ``make demo`` use; a
  broker on the plant network that lets anyone in lets anyone inject telemetry, forge or
  suppress alerts, so the agent refuses it unless told otherwise.
- ``false``: the agent must authenticate, and refuses to run against a broker that also accepts
  clients without credentials (checked once per process, on the first accepted connection).
- ``true``: no checks (a closed lab network, an external auth proxy).
"""
from __future__ import annotations

import socket
import ssl
import threading
import uuid

import paho.mqtt.client as mqtt

from agent.config import AgentConfig, ConfigError


def anonymous_policy_error(cfg: AgentConfig) -> str | None:
    """Why the agent must not connect as configured, or None. Checked before anything touches the network."""
    m = cfg.mqtt
    if m.username or m.anonymous_allowed():
        return None
    return (f"mqtt: refusing to connect anonymously to {m.host}, which is not a loopback broker "
            f"(set mqtt.username and mqtt.password_file, or mqtt.allow_anonymous: true)")


def must_refuse_anonymous_broker(cfg: AgentConfig) -> bool:
    """The agent authenticates and the broker must not let strangers in (see module doc)."""
    return bool(cfg.mqtt.username) and not cfg.mqtt.anonymous_allowed()


def describe_connect_error(e: BaseException, cfg: AgentConfig) -> str:
    """One line for a failed TCP/TLS connection, with the setting most likely to be wrong."""
    m = cfg.mqtt
    where = f"{m.host}:{m.port}"
    if isinstance(e, ssl.SSLCertVerificationError):
        msg = e.verify_message or str(e)
        if "mismatch" in msg.lower():
            hint = f"the broker certificate's subjectAltName must contain {m.host!r} (mqtt.host)"
        elif "self-signed" in msg.lower() or "issuer" in msg.lower():
            hint = f"mqtt.tls.ca_file ({m.tls.ca_file or 'system CAs'}) did not sign the broker certificate"
        else:
            hint = "check mqtt.tls.ca_file and the broker certificate"
        return f"TLS: broker {where} certificate rejected: {msg} ({hint})"
    if isinstance(e, ssl.SSLError):
        reason = e.reason or str(e)
        hint = ""
        if "certificate required" in str(e).lower() or "alert" in reason.lower():
            hint = " (does the broker require a client certificate? set mqtt.tls.cert_file and key_file)"
        elif "wrong version" in reason.lower() or "record" in reason.lower():
            hint = " (is this port a TLS listener?)"
        return f"TLS handshake with {where} failed: {reason}{hint}"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve broker host {m.host!r}: {e.strerror}"
    if isinstance(e, (TimeoutError, socket.timeout)):
        return f"connection to {where} timed out"
    if isinstance(e, ConnectionResetError) and m.tls.enabled and m.tls.cert_file is None:
        return f"{where} reset the TLS connection (does the broker require a client certificate?)"
    if isinstance(e, OSError) and e.strerror:
        return f"cannot connect to {where}: {e.strerror}"
    return f"cannot connect to {where}: {e}"


def describe_refusal(reason: str, cfg: AgentConfig) -> str:
    """A refused CONNACK, with a hint for credential problems."""
    low = reason.lower()
    if "user name or password" in low or "not authorized" in low or "bad authentication" in low:
        if not cfg.mqtt.username:
            return f"{reason}: the broker requires credentials (mqtt.username and mqtt.password_file)"
        src = f" in {cfg.mqtt.password_file}" if cfg.mqtt.password_file else " (no mqtt.password_file set)"
        return f"{reason}: check mqtt.username {cfg.mqtt.username!r} and the password{src}"
    return reason


def describe_early_close(detail: str, cfg: AgentConfig) -> str:
    """The broker closed the connection before any CONNACK (a TLS 1.3 broker that wants a client
    certificate says so only after the handshake; a TLS listener reached without TLS resets)."""
    m = cfg.mqtt
    if m.tls.enabled and m.tls.cert_file is None:
        hint = "does the broker require a client certificate? set mqtt.tls.cert_file and key_file"
    elif not m.tls.enabled:
        hint = "is this a TLS listener? then set mqtt.tls.enabled"
    else:
        hint = "does the broker trust the CA that signed mqtt.tls.cert_file?"
    detail = detail.removeprefix("failed to receive on socket: ")
    return f"{m.host}:{m.port} closed the connection before accepting it: {detail} ({hint})"


def try_connect(cfg: AgentConfig, timeout: float = 3.0, anonymous: bool = False) -> tuple[str, str]:
    """One connection attempt with a throwaway client id (a running agent keeps its session).

    Returns (outcome, detail) with outcome ``accepted``, ``refused`` (CONNACK failure or TLS
    rejected) or ``unreachable``. ``anonymous``: no user name, password or client certificate,
    as a stranger on the network would try.
    """
    if anonymous:
        m = cfg.mqtt
        tls = m.tls.model_copy(update={"cert_file": None, "key_file": None})
        cfg = cfg.model_copy(update={"mqtt": m.model_copy(update={"username": None, "password_file": None, "tls": tls})})
    done = threading.Event()
    result: list[str] = []
    errors: list[str] = []

    def on_connect(client, userdata, flags, reason_code, properties):
        result.append("" if not reason_code.is_failure else str(reason_code))
        done.set()

    def on_disconnect(client, userdata, flags, reason_code, properties):
        # Closed before any CONNACK: with TLS 1.3 a broker that wants a client certificate says
        # so only after the handshake, so this is where a missing certificate shows up.
        if not done.is_set():
            result.append("closed:" + (errors[-1] if errors else str(reason_code)))
            done.set()

    def on_log(client, userdata, level, buf):
        if level == mqtt.MQTT_LOG_ERR:
            errors.append(buf)

    from agent.mqtt_link import _connect_args, make_client  # not at the top: agent.mqtt_link imports this module

    client = make_client(cfg, f"edgewatch-check-{uuid.uuid4().hex[:8]}", persistent=False)
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_log = on_log
    client.connect_timeout = timeout
    m = cfg.mqtt
    try:
        client.connect(m.host, m.port, keepalive=10, **_connect_args(cfg, persistent=False))
    except ssl.SSLError as e:
        return "refused", describe_connect_error(e, cfg)
    except (OSError, ValueError) as e:
        return "unreachable", describe_connect_error(e, cfg)
    client.loop_start()
    try:
        if not done.wait(timeout):
            return "unreachable", f"no CONNACK from {m.host}:{m.port} within {timeout:g}s"
        if result[0].startswith("closed:"):
            return "refused", describe_early_close(result[0].removeprefix("closed:"), cfg)
        if result[0]:
            return "refused", f"{m.host}:{m.port} refused the connection: {describe_refusal(result[0], cfg)}"
        return "accepted", f"{m.host}:{m.port} accepted the connection"
    finally:
        client.disconnect()
        client.loop_stop()


def anonymous_broker_check(cfg: AgentConfig, timeout: float = 3.0) -> tuple[str, str]:
    """Does the broker let a client in without credentials, where the policy forbids that?

    Returns (status, detail): ``skip`` (policy allows anonymity), ``ok`` (the broker refused a
    stranger), ``FAIL`` (it accepted one) or ``unknown`` (no answer).
    """
    m = cfg.mqtt
    if not must_refuse_anonymous_broker(cfg):
        why = "allowed by mqtt.allow_anonymous" if m.allow_anonymous else "allowed for a loopback broker"
        return "skip", f"anonymous clients {why}" if not m.username else f"not tested: anonymous clients {why}"
    outcome, detail = try_connect(cfg, timeout, anonymous=True)
    if outcome == "accepted":
        return "FAIL", (f"broker {m.host}:{m.port} accepts clients without credentials, so anyone on the network "
                        f"can inject telemetry or forge alerts (set allow_anonymous false in the broker, or "
                        f"mqtt.allow_anonymous: true in the agent to accept this)")
    if outcome == "refused":
        return "ok", "broker refuses clients without credentials"
    return "unknown", f"could not test whether the broker refuses anonymous clients: {detail}"


def check_policy(cfg: AgentConfig) -> None:
    """Raise ConfigError if the configuration would connect anonymously where that is not allowed."""
    why = anonymous_policy_error(cfg)
    if why:
        raise ConfigError(why)
