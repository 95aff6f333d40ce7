#!/usr/bin/env bash
# Remove the edgewatch agent service installed by install.sh.
#
#   sudo deploy/uninstall.sh            stop, disable, remove unit and /opt/edgewatch;
#                                       keep config, credentials, bundles, outbox
#   sudo deploy/uninstall.sh --purge    also remove /etc/edgewatch, the site drop-in
#                                       and the state directory (unsent alerts!)
#   deploy/uninstall.sh --root DIR      operate under DIR, no systemctl
#   deploy/uninstall.sh --dry-run       print what would be removed
set -euo pipefail

PROG=uninstall.sh
die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }

PURGE=0
ROOT=
DRY=0
while [ $# -gt 0 ]; do
    case $1 in
        --purge) PURGE=1; shift ;;
        --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done
if [ -n "$ROOT" ]; then
    [ -d "$ROOT" ] || die "--root $ROOT: no such directory"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" != / ] || ROOT=
fi
if [ "$DRY" = 0 ] && [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
    die "must run as root (or use --dry-run, or --root DIR)"
fi

SERVICE=edgewatch-agent.service
UNIT=$ROOT/etc/systemd/system/$SERVICE
DROPIN_DIR=$ROOT/etc/systemd/system/$SERVICE.d

run() { if [ "$DRY" = 1 ]; then say "would run: $*"; else say "run: $*"; "$@"; fi; }
remove() {
    local p
    for p in "$@"; do
        [ -e "$p" ] || [ -L "$p" ] || continue
        if [ "$DRY" = 1 ]; then say "would remove $p"; else rm -rf -- "$p"; say "removed $p"; fi
    done
}

[ "$DRY" = 1 ] && say "dry run: nothing will be changed"
if [ -z "$ROOT" ]; then
    command -v systemctl >/dev/null || die "systemctl not found (use --root DIR to only remove files)"
    # Stopping sends STOPPING=1 and lets the agent flush; unsent alerts stay in
    # the state directory unless --purge.
    if [ "$DRY" = 1 ] || systemctl cat "$SERVICE" >/dev/null 2>&1; then
        run systemctl disable --now "$SERVICE"
    fi
fi

remove "$UNIT" "$ROOT/opt/edgewatch"
if [ "$PURGE" = 1 ]; then
    # DynamicUser= keeps the real directory in /var/lib/private/ behind a symlink.
    remove "$DROPIN_DIR" "$ROOT/etc/edgewatch" "$ROOT/var/lib/edgewatch" "$ROOT/var/lib/private/edgewatch"
else
    for p in "$DROPIN_DIR" "$ROOT/etc/edgewatch" "$ROOT/var/lib/edgewatch"; do
        [ -e "$p" ] && say "kept $p (use --purge to remove)"
    done
fi

if [ -z "$ROOT" ]; then
    run systemctl daemon-reload
    run systemctl reset-failed "$SERVICE" 2>/dev/null || true
else
    say "skipped systemctl (--root)"
fi
say "done"
