"""The agent against a real mosquitto with TLS and a password file, certificates made here with
openssl: the right CA connects, a wrong CA or a certificate for another name does not (unless
tls.insecure), a wrong password is "not ready" with a clear reason, mutual TLS works, and an
agent that must not talk to an anonymous broker refuses to run against one."""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.app import App
from agent.buffered_socket import BufferedSocket
from agent.cli import main
from agent.config import load_config
from conftest import free_port, wait_port
from ops_helpers import http_get, wait_until
from tiny_bundle import make_tiny_bundle

USER, PASSWORD = "edgewatch-agent", "s3cret-agent"


def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)


def make_pki(d: Path) -> None:
    """CA, an unrelated CA, and CA-signed leaves: server (localhost, 127.0.0.1), other-name server, client."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for ca in ("ca", "other-ca"):
        _openssl(d, "req", "-x509", *ec, "-days", "2", "-subj", f"/CN=edgewatch {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.crt")
    for name, san in (("server", "DNS:localhost,IP:127.0.0.1"), ("elsewhere", "DNS:broker.example"),
                      ("client", f"DNS:{USER}")):
        _openssl(d, "req", *ec, "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")


def mosquitto_hash(password: str, iterations: int = 101) -> str:
    """mosquitto 2's password_file format: $7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512>."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def make_password_file(path: Path) -> None:
    """The agent via mosquitto_passwd where installed; a second user always through our own hash,
    so both paths are exercised (and the file works without mosquitto_passwd)."""
    if shutil.which("mosquitto_passwd"):
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(path), USER, PASSWORD], check=True, capture_output=True)
    else:
        path.write_text(f"{USER}:{mosquitto_hash(PASSWORD)}\n")
    with open(path, "a") as f:
        f.write(f"hmi:{mosquitto_hash('hmi-pw')}\n")
    path.chmod(0o600)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """One mosquitto, four TLS listeners: secure (password), mtls (client cert + password),
    elsewhere (certificate for another name) and open (also accepts anonymous clients)."""
    if not shutil.which("mosquitto") or not shutil.which("openssl"):
        pytest.fail("mosquitto and openssl are required for the TLS tests")
    d = tmp_path_factory.mktemp("tls")
    make_pki(d)
    make_password_file(d / "passwd")
    ports = {name: free_port() for name in ("secure", "mtls", "elsewhere", "open")}
    conf = [f"per_listener_settings true\nlog_dest file {d}/mosquitto.log\nlog_type all\n"]
    for name, port in ports.items():
        cert = "elsewhere" if name == "elsewhere" else "server"
        conf.append(f"listener {port} 127.0.0.1\ncafile {d}/ca.crt\ncertfile {d}/{cert}.crt\nkeyfile {d}/{cert}.key\n"
                    f"require_certificate {'true' if name == 'mtls' else 'false'}\n"
                    f"allow_anonymous {'true' if name == 'open' else 'false'}\npassword_file {d}/passwd\n")
    if os.geteuid() == 0:  # else mosquitto drops to its own user and cannot read pytest's 0700 tmp dirs
        conf.append("user root\n")
    (d / "mosquitto.conf").write_text("".join(conf))
    proc = subprocess.Popen(["mosquitto", "-c", str(d / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        for port in ports.values():
            wait_port(port)
    except RuntimeError:
        proc.kill()
        pytest.fail(f"mosquitto did not start: {proc.communicate()[1].decode()}")
    (d / "creds").mkdir()
    (d / "creds" / "mqtt_password").write_text(PASSWORD + "\n")
    (d / "wrong_password").write_text("guess\n")
    yield SimpleNamespace(dir=d, **ports)
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _env(monkeypatch, tls):
    for k in list(os.environ):
        if k.startswith("EDGEWATCH_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tls.dir / "creds"))  # as systemd LoadCredential= sets it


def mqtt_settings(pki, port: int, host: str = "127.0.0.1", **over) -> dict:
    tls_over = over.pop("tls", {})
    return {"host": host, "port": port, "username": USER, "password_file": "$CREDENTIALS_DIRECTORY/mqtt_password",
            "reconnect_min_s": 1, "reconnect_max_s": 1,
            "tls": {"enabled": True, "ca_file": str(pki.dir / "ca.crt"), **tls_over}, **over}


def make_app(tmp_path, tiny, mqtt: dict) -> App:
    cfg = load_config(agent_id="gw-tls", bundle=str(tiny), state_dir=str(tmp_path / "state"), bundle_watch_s=0,
                      mqtt=mqtt, topics={"telemetry": ["tls/+/{device}/telemetry"], "status": "tls/status/{agent_id}",
                                         "model": "tls/status/{agent_id}/model"},
                      metrics={"port": 0})
    return App(cfg)


def refusal_of(app: App, needle: str) -> str:
    wait_until(lambda: app.link.last_refusal is not None and needle in app.link.last_refusal, timeout=10,
               what=f"refusal containing {needle!r} (last: {app.link.last_refusal})")
    return app.link.last_refusal


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_connects_with_the_right_ca_and_the_credential_file(tmp_path, tiny, tls, host):
    app = make_app(tmp_path, tiny, mqtt_settings(tls, tls.secure, host=host, allow_anonymous=False)).start()
    try:
        assert app.link.wait_connected(10), app.link.last_refusal
        assert not isinstance(app.link.client.socket(), BufferedSocket)  # TLS keeps paho's own reads
        # allow_anonymous false: ready only after the broker was seen to turn a stranger away.
        wait_until(lambda: http_get(app.http.port, "/readyz")[0] == 200, what="ready")
        assert app.fatal is None
    finally:
        app.stop()


def test_wrong_ca_is_refused_and_logged_once(tmp_path, tiny, tls, caplog):
    caplog.set_level(logging.INFO, logger="agent")
    app = make_app(tmp_path, tiny, mqtt_settings(tls, tls.secure, tls={"ca_file": str(tls.dir / "other-ca.crt")})).start()
    try:
        why = refusal_of(app, "certificate rejected")
        assert "other-ca.crt) did not sign the broker certificate" in why
        code, body = http_get(app.http.port, "/readyz")
        assert code == 503 and "TLS: broker 127.0.0.1" in body
        time.sleep(1.5)  # at least one more attempt with the same result
        logged = [r for r in caplog.records if "certificate rejected" in r.getMessage()]
        assert len(logged) == 1 and logged[0].levelno == logging.ERROR and not app.link.connected
    finally:
        app.stop()


def test_hostname_verification_is_on_unless_insecure(tmp_path, tiny, tls):
    app = make_app(tmp_path, tiny, mqtt_settings(tls, tls.elsewhere)).start()
    try:
        why = refusal_of(app, "mismatch")
        assert "subjectAltName must contain '127.0.0.1'" in why and not app.link.connected
    finally:
        app.stop()
    app = make_app(tmp_path, tiny, mqtt_settings(tls, tls.elsewhere, tls={"insecure": True})).start()
    try:
        assert app.link.wait_connected(10), app.link.last_refusal
    finally:
        app.stop()


def test_wrong_password_is_not_ready_with_a_clear_reason(tmp_path, tiny, tls, caplog):
    caplog.set_level(logging.INFO, logger="agent")
    app = make_app(tmp_path, tiny, mqtt_settings(tls, tls.secure, password_file=str(tls.dir / "wrong_password"))).start()
    try:
        why = refusal_of(app, "refused the connection")
        assert f"check mqtt.username '{USER}' and the password in {tls.dir / 'wrong_password'}" in why
        code, body = http_get(app.http.port, "/readyz")
        assert code == 503 and "Not authorized" in body
        assert app.metrics.registry.get_sample_value("edgewatch_mqtt_connected") == 0
        assert any(r.levelno == logging.ERROR and "broker refused the connection" in r.getMessage() for r in caplog.records)
    finally:
        app.stop()


def test_mutual_tls_needs_the_client_certificate(tmp_path, tiny, tls):
    app = make_app(tmp_path, tiny, mqtt_settings(tls, tls.mtls)).start()
    try:
        why = refusal_of(app, "closed the connection before accepting it")
        assert "does the broker require a client certificate" in why
    finally:
        app.stop()
    client = {"cert_file": str(tls.dir / "client.crt"), "key_file": str(tls.dir / "client.key")}
    app = make_app(tmp_path, tiny, mqtt_settings(tls, tls.mtls, tls=client)).start()
    try:
        assert app.link.wait_connected(10), app.link.last_refusal
    finally:
        app.stop()


def test_agent_refuses_to_run_against_a_broker_that_accepts_anonymous_clients(tmp_path, tiny, tls):
    cfg = tmp_path / "agent.yaml"
    creds = f"username: {USER}\n  password_file: $CREDENTIALS_DIRECTORY/mqtt_password"
    tls_yaml = f"tls: {{enabled: true, ca_file: {tls.dir / 'ca.crt'}}}"
    cfg.write_text(f"agent_id: gw-anon\nbundle: {tiny}\nstate_dir: {tmp_path / 'state'}\nmetrics: {{enabled: false}}\n"
                   f"mqtt:\n  host: 127.0.0.1\n  port: {tls.open}\n  {creds}\n  allow_anonymous: false\n  {tls_yaml}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWATCH_")}
    r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("edge-agent: error: mqtt: broker 127.0.0.1:") and "accepts clients without credentials" in last
    assert "Traceback" not in r.stderr

    # The same broker, explicitly accepted: the agent runs (checked in process; the policy is the only difference).
    app = make_app(tmp_path, tiny, mqtt_settings(tls, tls.open, allow_anonymous=True)).start()
    try:
        wait_until(lambda: http_get(app.http.port, "/readyz")[0] == 200, what="ready")
    finally:
        app.stop()


def test_check_reports_tls_broker_and_authentication(tmp_path, tiny, tls, capsys):
    def check(port: int, extra: str = "") -> tuple[int, str]:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"bundle: {tiny}\nstate_dir: {tmp_path / 'state'}\nmqtt:\n  host: 127.0.0.1\n  port: {port}\n"
                       f"  username: {USER}\n  password_file: $CREDENTIALS_DIRECTORY/mqtt_password\n"
                       f"  allow_anonymous: false\n  tls:\n    enabled: true\n    ca_file: {tls.dir / 'ca.crt'}\n{extra}")
        rc = main(["check", "--config", str(cfg), "--timeout", "3"])
        return rc, capsys.readouterr().out

    rc, out = check(tls.secure)
    assert rc == 0, out
    rows = {ln.split("  ")[0]: ln for ln in out.splitlines()}
    assert "ok" in rows["mqtt tls"] and "hostname verified" in rows["mqtt tls"]
    assert "accepted the connection" in rows["broker"]
    assert "broker refuses clients without credentials" in rows["mqtt auth"]

    rc, out = check(tls.open)
    assert rc == 1 and "accepts clients without credentials" in out

    rc, out = check(tls.elsewhere)
    assert rc == 1 and "IP address mismatch" in [ln for ln in out.splitlines() if ln.startswith("broker")][0]
