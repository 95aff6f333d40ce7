"""``edge-agent replay``: publish CSV rows as telemetry (commissioning, demos, benchmarks).

Each CSV is one device (named after the file unless ``--device``). The time column is
sent as ``ts``; label/fault columns are never sent. Rows are validated before the first
publish, so a bad file fails without half a replay.
"""
from __future__ import annotations

import csv
import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.decode import DecodeError, parse_ts, partition_of

NOT_SENT = ("label", "fault")


class ReplayError(Exception):
    pass


@dataclass
class Series:
    device: str
    sensors: list[str]
    ts: list[object]  # as in the file (epoch number or ISO string), or None
    values: list[list[float]]  # NaN = empty cell (not sent)


def read_csv(path: str | Path, device: str | None = None, time_col: str = "timestamp",
             exclude: tuple[str, ...] = NOT_SENT) -> Series:
    path = Path(path)
    try:
        f = open(path, newline="")
    except OSError as e:
        raise ReplayError(f"cannot read {path}: {e.strerror}") from None
    with f:
        try:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise ReplayError(f"{path} is empty")
            header = [h.strip() for h in header]
            if time_col not in header:
                raise ReplayError(f"{path} has no time column {time_col!r} (columns: {', '.join(header[:12])})")
            ti = header.index(time_col)
            cols = [(i, h) for i, h in enumerate(header) if i != ti and h not in exclude and h]
            if not cols:
                raise ReplayError(f"{path} has no sensor columns besides {time_col!r}")
            ts: list[object] = []
            values: list[list[float]] = []
            for line, rec in enumerate(reader, start=2):
                if not rec:
                    continue
                if len(rec) != len(header):
                    raise ReplayError(f"{path}:{line}: {len(rec)} fields, header has {len(header)}")
                t = rec[ti].strip()
                try:
                    parse_ts(t, 0.0)
                except DecodeError:
                    raise ReplayError(f"{path}:{line}: bad timestamp {t!r}") from None
                ts.append(_num_or_str(t))
                row = []
                for i, name in cols:
                    cell = rec[i].strip()
                    try:
                        v = float(cell) if cell else math.nan
                    except ValueError:
                        raise ReplayError(f"{path}:{line}: column {name!r} is not a number: {cell[:40]!r}") from None
                    row.append(v)
                values.append(row)
        except (csv.Error, UnicodeDecodeError) as e:
            raise ReplayError(f"{path}: not a readable CSV ({e})") from None
    if not values:
        raise ReplayError(f"{path} has a header but no rows")
    return Series(device or path.stem, [h for _, h in cols], ts, values)


def _num_or_str(t: str) -> object:
    try:
        return float(t) if t else None
    except ValueError:
        return t


def payload(series: Series, i: int, fmt: str = "json", ts_override: float | None = None) -> bytes:
    vals = {s: v for s, v in zip(series.sensors, series.values[i]) if v == v}
    ts = ts_override if ts_override is not None else series.ts[i]
    body = {"ts": ts, "values": vals} if fmt == "json" else {"ts": ts, **vals}
    return json.dumps(body, separators=(",", ":")).encode()


def parse_broker(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":") if ":" in s else (s, "", "1883")
    try:
        p = int(port)
        if not 0 < p < 65536:
            raise ValueError
    except ValueError:
        raise ReplayError(f"--broker {s!r}: expected HOST:PORT") from None
    return host or "127.0.0.1", p


def connect(host: str, port: int, timeout: float = 5.0, client: mqtt.Client | None = None) -> mqtt.Client:
    """Connect ``client`` (default: plain MQTT 5, anonymous) and wait for an accepted CONNACK."""
    done = threading.Event()
    result: list = []

    def on_connect(client, userdata, flags, reason_code, properties):
        result.append(reason_code)
        done.set()

    c = client or mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_connect = on_connect
    c.max_inflight_messages_set(200)
    c.connect_timeout = timeout
    try:
        c.connect(host, port, keepalive=30)
    except (OSError, ValueError) as e:
        raise ReplayError(f"cannot connect to broker {host}:{port}: {e}") from None
    c.loop_start()
    if not done.wait(timeout) or result[0].is_failure:
        c.loop_stop()
        why = result[0] if result else "no answer"
        raise ReplayError(f"broker {host}:{port} did not accept the connection: {why}")
    return c


def check_topic(topic: str, partitions: int | None = None) -> None:
    """A publishable topic pattern: one {device}, no wildcards, {partition} exactly when ``partitions`` is given."""
    if "{device}" not in topic or "+" in topic or "#" in topic:
        raise ReplayError(f"--topic {topic!r} needs {{device}} and no wildcards")
    if partitions is not None and partitions < 1:
        raise ReplayError("--partitions must be >= 1")
    if "{partition}" in topic and partitions is None:
        raise ReplayError(f"topic {topic!r} has {{partition}}: give --partitions N (the agents' topics.partition.count)")
    if partitions is not None and "{partition}" not in topic:
        raise ReplayError(f"--partitions needs {{partition}} in the topic ({topic!r} has none)")


def device_topic(topic: str, device: str, line: str = "line1", partitions: int | None = None) -> str:
    """``topic`` for one device: {line}, {device}, and {partition} = crc32(device) % ``partitions``
    (the partition whose agent subscribes to it, see topics.partition)."""
    t = topic.replace("{line}", line).replace("{device}", device)
    return t.replace("{partition}", str(partition_of(device, partitions))) if partitions else t


def replay(client: mqtt.Client, series: list[Series], topic: str, rate: float = 0.0, qos: int = 1,
           fmt: str = "json", restamp: bool = False, line: str = "line1",
           stop: threading.Event | None = None, partitions: int | None = None) -> int:
    """Publish all rows, interleaving devices row by row; ``rate`` rows/s per device (0 = flat out)."""
    check_topic(topic, partitions)
    offsets = {}
    if restamp:  # shift each file so its first row is now, keeping the spacing
        now = time.time()
        offsets = {s.device: now - parse_ts(s.ts[0], now) for s in series}
    topics = {s.device: device_topic(topic, s.device, line, partitions) for s in series}
    n = 0
    infos = []
    start = time.monotonic()
    for i in range(max(len(s.values) for s in series)):
        if stop is not None and stop.is_set():
            break
        if rate > 0:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        for s in series:
            if i >= len(s.values):
                continue
            ts = parse_ts(s.ts[i], time.time()) + offsets[s.device] if restamp else None
            info = client.publish(topics[s.device], payload(s, i, fmt, ts), qos=qos)
            if qos:
                infos.append(info)
            n += 1
    for info in infos:  # wait for the broker to have them all
        info.wait_for_publish(10.0)
    return n
