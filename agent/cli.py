"""``edge-agent``: run the gateway service, check a gateway, install and roll back bundles, replay CSV telemetry.

Bad input ends with one line ``edge-agent: error: ...`` and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
import threading
import time

from agent import __version__

EXIT_FAIL = 1
EXIT_USAGE = 2

MAIN_HELP = """\
Anomaly detection for factory sensor streams on an edge gateway: subscribes to MQTT
telemetry, scores each device's sliding window with a VAE bundle (onnxruntime or LiteRT)
and publishes alerts (QoS 1, with an outbox so none is lost while the broker is away).

Every setting comes from a YAML/TOML file (--config) and can be overridden by an
environment variable EDGEWATCH_<SECTION>__<FIELD>, e.g. EDGEWATCH_MQTT__HOST=broker.local.
"""

MAIN_EPILOG = """\
examples:
  edge-agent check --config /etc/edgewatch/agent.yaml
  edge-agent run --config /etc/edgewatch/agent.yaml
  edge-agent install-bundle ./pump-vae-1.3.0 --config /etc/edgewatch/agent.yaml
  edge-agent rollback --config /etc/edgewatch/agent.yaml
  EDGEWATCH_BUNDLE=/var/lib/edgewatch/bundle edge-agent run
  edge-agent replay --csv pump-01.csv --rate 10 --broker 127.0.0.1:1883
"""

RUN_HELP = """\
Run the service until SIGTERM/SIGINT. Loads and verifies the bundle (hashes, golden
vectors), serves /metrics, /healthz and /readyz, connects to the broker with a persistent
session, and tells systemd READY=1 once the bundle is loaded and the broker accepted it.
SIGHUP (systemctl reload) re-reads the config and bundle, and the bundle directory is
watched (bundle_watch_s): a bundle that fails its checks is refused and the one in service
stays; connection and topic changes need a restart.
"""

CHECK_HELP = """\
Validate the configuration and the bundle, run the golden vectors of every model in the
bundle (VAE, and generator and classifier when present) and one test inference on every
installed backend, and try to connect to the broker (with TLS and credentials as
configured; where anonymous clients are not allowed, also check that the broker refuses
them). Prints a table; exits 0 when nothing failed, 1 otherwise. Safe next to a running
agent (it uses its own client id).
"""

SELFTEST_HELP = """\
Synthesise windows of every fault type with the bundle's generator, stream each (after a
synthetic normal lead-in) through the live scoring path on a private synthetic device, and
report per fault type how often the detector raised an alert and what the fault classifier
named it. Exits 0 when every fault type is detected in at least selftest.min_detected (0.5)
of its windows, 1 otherwise. Publishes nothing and touches no real device state. Needs a
bundle trained with `edge-trainer fit --fault-col`.
"""

INSTALL_BUNDLE_HELP = """\
Verify a bundle (schema, sha256 of every file, golden vectors on the configured backend),
copy it to bundles/<name>-<version>/ next to the configured bundle path, and switch the
bundle symlink to it atomically; bundle.previous then names the bundle it replaced. The
running agent picks the switch up within bundle_watch_s seconds (or on systemctl reload),
verifies it again and keeps serving the old one if it refuses it.
"""

ROLLBACK_HELP = """\
Switch the bundle symlink back to bundle.previous (after verifying it); bundle.previous
then names the bundle rolled away from, so a second rollback undoes the first. The running
agent picks it up like any other switch.
"""

REPLAY_HELP = """\
Publish CSV rows as telemetry JSON {"ts": <time column>, "values": {<sensor>: <number>}}.
One CSV per device (named after the file). Columns label and fault are never sent; empty
cells are left out (the agent treats them as missing).
"""

REPLAY_EPILOG = """\
examples:
  edge-agent replay --csv data/pump-01.csv                       # as fast as possible
  edge-agent replay --csv a.csv --csv b.csv --rate 1 --restamp    # live-like, timestamps from now
  edge-agent replay --csv pump.csv --device pump-07 --line line2 --broker gw.local:1883
  edge-agent replay --csv pump.csv --config agent.yaml            # broker and topic from the agent config
  edge-agent replay --csv a.csv --csv b.csv --topic 'factory/p{partition}/{line}/{device}/telemetry' --partitions 2
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        sys.stderr.write(f"edge-agent: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USAGE)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edge-agent", description=MAIN_HELP, epilog=MAIN_EPILOG, formatter_class=_formatter)
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run the service", description=RUN_HELP, formatter_class=_formatter)
    r.add_argument("--config", metavar="FILE", help="YAML or TOML config file (default: defaults + EDGEWATCH_* env)")

    c = sub.add_parser("check", help="check config, bundle, backends and broker", description=CHECK_HELP,
                       formatter_class=_formatter)
    c.add_argument("--config", metavar="FILE", help="YAML or TOML config file")
    c.add_argument("--no-broker", action="store_true", help="skip the broker connection test")
    c.add_argument("--timeout", type=float, default=3.0, metavar="S", help="broker connection timeout (default 3)")

    st = sub.add_parser("selftest", help="commissioning check: does the detector see synthetic faults?",
                        description=SELFTEST_HELP, formatter_class=_formatter)
    st.add_argument("--config", metavar="FILE", help="YAML or TOML config file (bundle, backend, selftest settings)")
    st.add_argument("--per-class", type=int, metavar="N", help="synthetic windows per fault type (default: "
                    "selftest.per_class, 20)")
    st.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")

    ib = sub.add_parser("install-bundle", help="verify a bundle, install it side by side and switch to it",
                        description=INSTALL_BUNDLE_HELP, formatter_class=_formatter)
    ib.add_argument("src", metavar="SRC", help="bundle directory (manifest.json and model files)")
    ib.add_argument("--config", metavar="FILE", help="agent config (bundle path and backend)")
    ib.add_argument("--no-activate", action="store_true", help="install only; do not switch the symlink")

    rb = sub.add_parser("rollback", help="switch back to the previous bundle", description=ROLLBACK_HELP,
                        formatter_class=_formatter)
    rb.add_argument("--config", metavar="FILE", help="agent config (bundle path and backend)")

    rp = sub.add_parser("replay", help="publish CSV files as telemetry", description=REPLAY_HELP,
                        epilog=REPLAY_EPILOG, formatter_class=_formatter)
    rp.add_argument("--csv", metavar="PATH", action="append", required=True, help="CSV file; repeat for several devices")
    rp.add_argument("--rate", type=float, default=0.0, metavar="X", help="rows per second per device; 0 = as fast as possible (default)")
    rp.add_argument("--broker", metavar="HOST:PORT", help="broker address (default: from --config, else 127.0.0.1:1883)")
    rp.add_argument("--config", metavar="FILE", help="take broker, credentials and topic from this agent config")
    rp.add_argument("--device", metavar="NAME", help="device name (default: the CSV file name without extension)")
    rp.add_argument("--line", default="line1", metavar="L", help="value for {line} in the topic (default line1)")
    rp.add_argument("--topic", metavar="PATTERN", help="topic with {device} (and {line}, {partition}); default "
                    "factory/{line}/{device}/telemetry")
    rp.add_argument("--partitions", type=int, metavar="N", help="{partition} in the topic becomes crc32(device) %% N, "
                    "the partitioned layout of topics.partition (default: count from --config)")
    rp.add_argument("--qos", type=int, choices=(0, 1), default=1, help="MQTT QoS (default 1)")
    rp.add_argument("--format", choices=("json", "flat"), default="json", help="payload shape (default json)")
    rp.add_argument("--time-col", default="timestamp", metavar="C", help="time column (default timestamp)")
    rp.add_argument("--exclude", default="label,fault", metavar="A,B", help="columns never sent (default label,fault)")
    rp.add_argument("--restamp", action="store_true", help="shift timestamps so each file starts now (keeps spacing)")
    return p


# ------------------------------------------------------------------ commands

def cmd_run(args) -> int:
    from agent.app import App
    from agent.config import load_config
    from agent.logging_setup import setup_logging

    cfg = load_config(args.config)
    setup_logging(cfg.log.format, cfg.log.level, static={"agent": cfg.agent_id})
    logging.getLogger(__name__).info("edge-agent %s starting (agent %s)", __version__, cfg.agent_id)
    App(cfg, args.config).run()
    return 0


def cmd_check(args) -> int:
    from agent.check import format_table, passed, run_checks
    from agent.config import load_config

    logging.basicConfig(level=logging.ERROR)
    cfg = load_config(args.config)
    rows = run_checks(cfg, broker=not args.no_broker, timeout=args.timeout)
    print(format_table(rows))
    ok = passed(rows)
    print("check passed" if ok else "check FAILED")
    return 0 if ok else EXIT_FAIL


def cmd_selftest(args) -> int:
    import json

    from agent.config import ConfigError, load_config
    from agent.selftest import quiet_runtime_banners, selftest_bundle

    logging.basicConfig(level=logging.ERROR)
    cfg = load_config(args.config)
    per_class = cfg.selftest.per_class if args.per_class is None else args.per_class
    if per_class < 1:
        raise ConfigError("--per-class must be at least 1")
    with quiet_runtime_banners():
        res = selftest_bundle(cfg.bundle, cfg.backend, per_class, cfg.selftest.min_detected, cfg.threads)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        print(res.table())
    if res.passed:
        print(res.summary())
        return 0
    sys.stderr.write(f"edge-agent: error: {res.summary()}\n")
    return EXIT_FAIL


def _store_and_verify(config: str | None):
    from agent.bundle_store import BundleStore, verify_bundle
    from agent.config import load_config

    cfg = load_config(config)
    return cfg, BundleStore(cfg.bundle), lambda path: verify_bundle(path, cfg.backend, cfg.threads)


def _pickup(cfg) -> str:
    if cfg.bundle_watch_s > 0:
        return f"the running agent switches within ~{2 * cfg.bundle_watch_s:g}s (or now: systemctl reload edgewatch-agent)"
    return "bundle_watch_s is 0: apply it with systemctl reload edgewatch-agent"


def cmd_install_bundle(args) -> int:
    logging.basicConfig(level=logging.ERROR)
    cfg, store, verify = _store_and_verify(args.config)
    dest, m, switched = store.install(args.src, verify, activate=not args.no_activate)
    print(f"verified {m.name} {m.version} ({len(m.features)} features, threshold {m.threshold.value:.4g}, {cfg.backend})")
    print(f"installed {dest}")
    if args.no_activate:
        print(f"not activated; {store.link} -> {store.current() or '(none)'}")
    elif not switched:
        print(f"{store.link} already points to {dest.name}")
    else:
        prev = store.previous()
        print(f"{store.link} -> {dest.name}" + (f" (previous: {prev.name})" if prev else ""))
        print(_pickup(cfg))
    return 0


def cmd_rollback(args) -> int:
    logging.basicConfig(level=logging.ERROR)
    cfg, store, verify = _store_and_verify(args.config)
    to, frm = store.rollback(verify)
    print(f"{store.link} -> {to.name}" + (f" (was {frm.name}; {store.previous_link.name} now points there)" if frm else ""))
    print(_pickup(cfg))
    return 0


def cmd_replay(args) -> int:
    from agent.replay import ReplayError, check_topic, connect, parse_broker, read_csv, replay

    if args.rate < 0:
        raise ReplayError("--rate must be >= 0")
    if args.device and len(args.csv) > 1:
        raise ReplayError("--device names one device; it cannot be used with several --csv")
    host, port, client, topic = "127.0.0.1", 1883, None, "factory/{line}/{device}/telemetry"
    partitions, cfg_partitions = args.partitions, None
    if args.config:
        import uuid

        from agent.config import load_config
        from agent.mqtt_link import make_client

        cfg = load_config(args.config)
        if cfg.topics.format == "per_sensor":
            raise ReplayError("replay publishes whole rows; the agent config uses per_sensor topics")
        host, port = cfg.mqtt.host, cfg.mqtt.port
        client = make_client(cfg, f"edgewatch-replay-{uuid.uuid4().hex[:8]}", persistent=False)  # credentials, TLS
        topic = "/".join("{line}" if lv == "+" else lv for lv in cfg.topics.telemetry[0].split("/"))
        if cfg.topics.partition is not None:
            cfg_partitions = cfg.topics.partition.count
    if args.broker:
        host, port = parse_broker(args.broker)
    topic = args.topic or topic
    if partitions is None and "{partition}" in topic:
        partitions = cfg_partitions
    check_topic(topic, partitions)
    exclude = tuple(x.strip() for x in args.exclude.split(",") if x.strip())
    series = [read_csv(p, args.device, args.time_col, exclude) for p in args.csv]
    client = connect(host, port, client=client)
    stop = threading.Event()
    t = time.monotonic()
    try:
        n = replay(client, series, topic, rate=args.rate, qos=args.qos, fmt=args.format, restamp=args.restamp,
                   line=args.line, stop=stop, partitions=partitions)
    except KeyboardInterrupt:
        stop.set()
        raise
    except RuntimeError as e:  # paho: connection lost while waiting for PUBACKs
        raise ReplayError(f"publishing failed: {e}") from None
    finally:
        client.disconnect()
        client.loop_stop()
    dt = time.monotonic() - t
    print(f"published {n} rows from {len(series)} device(s) to {host}:{port} in {dt:.2f}s ({n / max(dt, 1e-9):.0f} rows/s)")
    return 0


COMMANDS = {"run": cmd_run, "check": cmd_check, "selftest": cmd_selftest, "install-bundle": cmd_install_bundle, "rollback": cmd_rollback,
            "replay": cmd_replay}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from agent.config import ConfigError
    from agent.manifest import BundleError
    from agent.outbox import OutboxError
    from agent.replay import ReplayError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, BundleError, OutboxError, ReplayError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        sys.stderr.write(f"edge-agent: error: {msg}\n")
        return EXIT_FAIL
    except KeyboardInterrupt:
        sys.stderr.write("edge-agent: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
