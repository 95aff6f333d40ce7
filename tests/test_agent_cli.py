"""edge-agent command line: help that teaches, one-line errors, check and replay against mosquitto."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.cli import main
from tiny_bundle import make_fault_bundle, make_tiny_bundle


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("EDGEWATCH_"):
            monkeypatch.delenv(k)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    """Exactly one error line, last (``run`` may have logged its start before it)."""
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("edge-agent: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    return errors[0]


@pytest.mark.parametrize("argv,needles", [
    (["--help"], ["run", "check", "replay", "EDGEWATCH_MQTT__HOST", "examples:"]),
    (["replay", "--help"], ["--rate", "--broker", "--device", "--line", "--topic", "--qos", "examples:"]),
    (["check", "--help"], ["golden vectors", "--no-broker"]),
    (["run", "--help"], ["--config", "READY=1"]),
])
def test_help_teaches(capsys, argv, needles):
    rc, out, _ = run_cli(capsys, *argv)
    assert rc == 0
    for n in needles:
        assert n in out


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_bad_inputs_end_with_one_line(capsys, tmp_path, tiny):
    good_csv = write(tmp_path, "p.csv", "timestamp,a,b\n1700000000,1,2\n")
    bad_num = write(tmp_path, "n.csv", "timestamp,a,b\n1700000000,1,2\n1700000001,1,oops\n")
    no_time = write(tmp_path, "t.csv", "time,a\n1,2\n")
    bad_ts = write(tmp_path, "ts.csv", "timestamp,a\nsoon,2\n")
    bad_yaml = write(tmp_path, "c.yaml", "mqtt: [\n")
    bad_value = write(tmp_path, "v.yaml", "mqtt:\n  port: -1\n")
    no_bundle = write(tmp_path, "b.yaml", f"bundle: {tmp_path / 'missing'}\nmetrics: {{enabled: false}}\n")
    cases = [
        (["run", "--config", str(tmp_path / "none.yaml")], 1, "cannot read config file"),
        (["run", "--config", str(bad_yaml)], 1, "not valid yaml"),
        (["run", "--config", str(bad_value)], 1, "mqtt.port"),
        (["run", "--config", str(no_bundle)], 1, "bundle directory not found"),
        (["check", "--config", str(bad_value)], 1, "mqtt.port"),
        (["replay", "--csv", str(tmp_path / "none.csv")], 1, "cannot read"),
        (["replay", "--csv", str(bad_num)], 1, "n.csv:3: column 'b' is not a number"),
        (["replay", "--csv", str(no_time)], 1, "no time column 'timestamp'"),
        (["replay", "--csv", str(bad_ts)], 1, "bad timestamp"),
        (["replay", "--csv", str(good_csv), "--broker", "host:notaport"], 1, "--broker"),
        (["replay", "--csv", str(good_csv), "--rate", "-1"], 1, "--rate"),
        (["replay", "--csv", str(good_csv), "--topic", "x/+/t"], 1, "{device}"),
        (["replay", "--csv", str(good_csv), "--csv", str(good_csv), "--device", "d"], 1, "--device"),
        (["replay", "--csv", str(good_csv), "--topic", "x/p{partition}/{device}"], 1, "--partitions"),
        (["replay", "--csv", str(good_csv), "--partitions", "0"], 1, "--partitions"),
        (["replay", "--csv", str(good_csv), "--partitions", "2"], 1, "{partition}"),
        (["replay", "--csv", str(good_csv), "--broker", "127.0.0.1:1"], 1, "cannot connect"),
        (["replay"], 2, "--csv"),
        (["replay", "--csv", str(good_csv), "--rate", "fast"], 2, "--rate"),
        (["frobnicate"], 2, "invalid choice"),
    ]
    for argv, want_rc, needle in cases:
        rc, _, err = run_cli(capsys, *argv)
        line = one_line_error(err)
        assert rc == want_rc, (argv, err)
        assert needle.lower() in line.lower(), (argv, line)


def test_entry_point_prints_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(tmp_path / "x.toml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    one_line_error(r.stderr)


def test_check_passes_with_bundle_and_broker(capsys, tmp_path, tiny, broker):
    cfg = write(tmp_path, "a.yaml", f"agent_id: gw\nbundle: {tiny}\nstate_dir: {tmp_path / 'state'}\n"
                                     f"mqtt: {{host: {broker.host}, port: {broker.port}}}\n")
    rc, out, _ = run_cli(capsys, "check", "--config", str(cfg))
    assert rc == 0, out
    assert "backend onnxruntime (configured)  ok" in out and "golden vectors" in out
    assert "broker" in out and "accepted" in out and out.strip().endswith("check passed")


def test_check_fails_on_unreachable_broker_and_corrupt_bundle(capsys, tmp_path, tiny):
    import shutil

    bad = tmp_path / "bundle"
    shutil.copytree(tiny, bad)
    (bad / "vae.onnx").write_bytes(b"garbage")
    cfg = write(tmp_path, "a.yaml", f"bundle: {bad}\nstate_dir: {tmp_path / 'state'}\nmqtt: {{port: 1}}\n")
    rc, out, _ = run_cli(capsys, "check", "--config", str(cfg), "--timeout", "1")
    assert rc == 1
    assert "bundle file corrupt" in out and "check FAILED" in out
    assert [ln for ln in out.splitlines() if ln.startswith("broker")][0].split()[1] == "FAIL"


def _backend_row(out: str, name: str = "onnxruntime") -> str:
    return [ln for ln in out.splitlines() if ln.startswith(f"backend {name}")][0]


def test_check_golden_checks_every_model_in_the_bundle(capsys, tmp_path):
    b = make_fault_bundle(tmp_path / "b", {"spike": 10.0}, classifier=True)
    cfg = write(tmp_path, "a.yaml", f"bundle: {b}\nstate_dir: {tmp_path / 'state'}\n")
    rc, out, _ = run_cli(capsys, "check", "--config", str(cfg), "--no-broker")
    assert rc == 0, out
    row = _backend_row(out)
    assert " ok " in row and "golden vectors" in row
    for model in ("vae", "generator", "classifier"):
        assert model in row, row


@pytest.mark.parametrize("model,output", [("classifier", "probs"), ("generator", "window")])
def test_check_fails_naming_the_model_whose_golden_outputs_do_not_match(capsys, tmp_path, model, output):
    import numpy as np

    from agent.manifest import load_manifest, sha256_file, write_manifest

    b = make_fault_bundle(tmp_path / "b", {"spike": 10.0}, classifier=True)
    golden = b / f"{model}_golden.npz"
    with np.load(golden) as g:
        arrays = dict(g)
    arrays[f"out_{output}"] = arrays[f"out_{output}"] + 0.5  # tampered, and re-hashed so only the parity check can tell
    np.savez(golden, **arrays)
    m = load_manifest(b, verify=False)
    entry = m.models[model].model_copy(update={"golden_sha256": sha256_file(golden)})
    write_manifest(b, m.model_copy(update={"models": {**m.models, model: entry}}))
    cfg = write(tmp_path, "a.yaml", f"bundle: {b}\nstate_dir: {tmp_path / 'state'}\n")
    rc, out, _ = run_cli(capsys, "check", "--config", str(cfg), "--no-broker")
    assert rc == 1 and out.strip().endswith("check FAILED"), out
    row = _backend_row(out)
    assert row.split()[3] == "FAIL", row
    assert f"{model}.{output} differs from golden vectors" in row, row
    assert "Traceback" not in out


@contextlib.contextmanager
def _subscribed(broker, prefix: str, n: int):
    """Collects (topic, JSON payload) under ``prefix/#``; the event is set once ``n`` arrived."""
    got, done = [], threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(c, u, msg):
        got.append((msg.topic, json.loads(msg.payload)))
        if len(got) == n:
            done.set()

    sub.on_message = on_message
    sub.connect(broker.host, broker.port)
    sub.subscribe(f"{prefix}/#", qos=1)
    sub.loop_start()
    try:
        time.sleep(0.2)
        yield got, done
    finally:
        sub.disconnect()
        sub.loop_stop()


def test_replay_publishes_csv_as_telemetry(capsys, tmp_path, broker):
    csv = write(tmp_path, "pump-01.csv",
                "timestamp,a,b,label,fault\n"
                "2024-01-01T00:00:00Z,1.5,2,0,\n"
                "2024-01-01T00:00:01Z,,3,1,bearing\n"
                "2024-01-01T00:00:02Z,2.5,4,1,bearing\n")
    prefix = f"rp-{uuid.uuid4().hex[:6]}"
    with _subscribed(broker, prefix, 6) as (got, done):
        rc, out, err = run_cli(capsys, "replay", "--csv", str(csv), "--broker", f"{broker.host}:{broker.port}",
                               "--topic", prefix + "/{line}/{device}/telemetry", "--line", "L2")
        assert rc == 0, err
        assert "published 3 rows from 1 device(s)" in out
        cfg = write(tmp_path, "a.yaml", f"mqtt: {{host: {broker.host}, port: {broker.port}}}\n"
                                         f"topics: {{telemetry: ['{prefix}/+/{{device}}/telemetry']}}\n")
        rc, out, err = run_cli(capsys, "replay", "--csv", str(csv), "--config", str(cfg), "--line", "L3")
        assert rc == 0, err
        assert done.wait(5)
    assert {t for t, _ in got} == {f"{prefix}/L2/pump-01/telemetry", f"{prefix}/L3/pump-01/telemetry"}
    got = got[:3]
    assert got[0][1] == {"ts": "2024-01-01T00:00:00Z", "values": {"a": 1.5, "b": 2.0}}
    assert got[1][1]["values"] == {"b": 3.0}  # empty cell left out; label/fault never sent


def test_replay_publishes_to_the_partitioned_topic_layout(capsys, tmp_path, broker):
    """{partition} in the topic becomes crc32(device) % count, the partition the agents subscribe to
    (count from --partitions, or from the agent config's topics.partition)."""
    from agent.decode import partition_of

    devices = [f"pump-{i:02d}" for i in range(1, 7)]
    csvs = [str(write(tmp_path, f"{d}.csv", "timestamp,a\n1700000000,1\n")) for d in devices]
    prefix = f"rp-{uuid.uuid4().hex[:6]}"
    with _subscribed(broker, prefix, 3 * len(devices)) as (got, done):
        cfg = write(tmp_path, "a.yaml", f"mqtt: {{host: {broker.host}, port: {broker.port}}}\n"
                                         f"topics:\n  telemetry: ['{prefix}/a/p{{partition}}/+/{{device}}/telemetry']\n"
                                         f"  partition: {{index: 0, count: 3}}\n")
        argv = [x for c in csvs for x in ("--csv", c)]
        rc, out, err = run_cli(capsys, "replay", *argv, "--config", str(cfg))
        assert rc == 0, err
        rc, out, err = run_cli(capsys, "replay", *argv, "--broker", f"{broker.host}:{broker.port}",
                               "--topic", prefix + "/b/p{partition}/{device}", "--partitions", "2")
        assert rc == 0, err
        # Partitioned agents, publishers unchanged (no {partition} in the pattern): plain topics.
        cfg = write(tmp_path, "c.yaml", f"mqtt: {{host: {broker.host}, port: {broker.port}}}\n"
                                         f"topics:\n  telemetry: ['{prefix}/c/+/{{device}}/telemetry']\n"
                                         f"  partition: {{index: 1, count: 3}}\n")
        rc, out, err = run_cli(capsys, "replay", *argv, "--config", str(cfg))
        assert rc == 0, err
        assert done.wait(5), got
    got = [t for t, _ in got]
    want = {f"{prefix}/a/p{partition_of(d, 3)}/line1/{d}/telemetry" for d in devices}
    want |= {f"{prefix}/b/p{partition_of(d, 2)}/{d}" for d in devices}
    want |= {f"{prefix}/c/line1/{d}/telemetry" for d in devices}
    assert set(got) == want
    assert len({t.split("/")[2] for t in got if t.startswith(f"{prefix}/a/")}) > 1  # the devices really are spread
