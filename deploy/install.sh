#!/usr/bin/env bash
# Install or upgrade the edgewatch agent as a systemd service.
#
#   sudo deploy/install.sh                     install from this checkout and start
#   sudo deploy/install.sh --source X.whl      install a built wheel instead
#   sudo deploy/install.sh --bundle DIR        also deploy a model bundle
#   deploy/install.sh --root /tmp/t            test root: every path under /tmp/t,
#                                              no systemctl, no pip unless --pip
#   deploy/install.sh --dry-run                print what would be done, change nothing
#
# Idempotent: a re-run upgrades the agent, the unit and the example config in
# place and keeps /etc/edgewatch/agent.yaml, credentials, the site drop-in and
# the state directory. Every file it writes is printed.
set -euo pipefail

PROG=install.sh
usage() {
    cat <<'EOF'
usage: install.sh [options]
  --source PATH   repo checkout or wheel to pip-install (default: this checkout)
  --litert        also install the LiteRT backend (pip extra [litert])
  --bundle DIR    copy a model bundle to /etc/edgewatch/bundles/<name>-<version>
                  and point /etc/edgewatch/bundle at it (bundle.previous then
                  names the one it replaced, for edge-agent rollback)
  --python PATH   interpreter for the venv (default: /usr/bin/python3; >= 3.11)
  --no-start      enable the service but do not start or restart it
  --root DIR      install under DIR (tests, image builds): no systemctl, and
                  no pip install unless --pip is given
  --pip           with --root: do run pip into DIR/opt/edgewatch/venv
  --dry-run       print the actions, write nothing
  -h, --help      this help
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SOURCE=$REPO
LITERT=0
BUNDLE=
PYTHON=/usr/bin/python3
START=1
ROOT=
PIP_IN_ROOT=0
DRY=0
BUNDLE_SWITCHED=0

while [ $# -gt 0 ]; do
    case $1 in
        --source) [ $# -ge 2 ] || die "--source needs a path"; SOURCE=$2; shift 2 ;;
        --litert) LITERT=1; shift ;;
        --bundle) [ $# -ge 2 ] || die "--bundle needs a directory"; BUNDLE=$2; shift 2 ;;
        --python) [ $# -ge 2 ] || die "--python needs a path"; PYTHON=$2; shift 2 ;;
        --no-start) START=0; shift ;;
        --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
        --pip) PIP_IN_ROOT=1; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

# --- where things go ------------------------------------------------------------
if [ -n "$ROOT" ]; then
    [ -d "$ROOT" ] || die "--root $ROOT: no such directory"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" != / ] || ROOT=
fi
OPT=$ROOT/opt/edgewatch
VENV=$OPT/venv
ETC=$ROOT/etc/edgewatch
CREDS=$ETC/credentials
UNIT_DIR=$ROOT/etc/systemd/system
UNIT=$UNIT_DIR/edgewatch-agent.service
DROPIN_DIR=$UNIT_DIR/edgewatch-agent.service.d
SERVICE=edgewatch-agent.service

# systemctl and pip run only on the real system (or pip with --root --pip).
SYSTEMD=1
RUN_PIP=1
if [ -n "$ROOT" ]; then
    SYSTEMD=0
    RUN_PIP=$PIP_IN_ROOT
fi

for f in systemd/edgewatch-agent.service systemd/10-site.conf deploy/agent.example.yaml deploy/README.md; do
    [ -f "$REPO/$f" ] || die "$REPO/$f is missing; run install.sh from an edgewatch checkout"
done
if [ "$DRY" = 0 ] && [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
    die "must run as root (or use --dry-run, or --root DIR for a test root)"
fi
if [ "$RUN_PIP" = 1 ]; then
    [ -e "$SOURCE" ] || die "--source $SOURCE: no such file or directory"
    [ -x "$PYTHON" ] || die "$PYTHON not found; install python3 (>= 3.11) and python3-venv, or pass --python"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is $("$PYTHON" -c 'import platform; print(platform.python_version())'); edgewatch needs Python >= 3.11"
    # The service runs with ProtectHome=yes: an interpreter under /home or
    # /root (pyenv, conda) would be invisible to it.
    case $(readlink -f "$PYTHON") in
        /home/*|/root/*) die "$PYTHON lives under /home or /root, which the sandboxed service cannot see; use a system python3 (--python /usr/bin/python3)" ;;
    esac
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
        || die "$PYTHON has no venv/ensurepip module; on Debian/Ubuntu: apt-get install python3-venv"
fi
if [ -n "$BUNDLE" ]; then
    [ -f "$BUNDLE/manifest.json" ] || die "--bundle $BUNDLE: no manifest.json there (not a bundle directory)"
fi
if [ "$SYSTEMD" = 1 ] && [ "$DRY" = 0 ]; then
    command -v systemctl >/dev/null || die "systemctl not found: this installer needs systemd (use --root DIR to only lay out files)"
fi

# --- helpers (each prints what it does; --dry-run only prints) -----------------
CHANGED=0   # something the running agent uses changed -> restart it

run() {
    if [ "$DRY" = 1 ]; then say "would run: $*"; else say "run: $*"; "$@"; fi
}

# mkdir_mode MODE DIR: create DIR (and parents) if missing, enforce MODE.
mkdir_mode() {
    local mode=$1 dir=$2
    if [ -d "$dir" ]; then
        if [ "$(stat -c %a "$dir")" != "${mode#0}" ]; then
            if [ "$DRY" = 1 ]; then say "would chmod $mode $dir"; else chmod "$mode" "$dir"; say "chmod $mode $dir"; fi
        fi
        return 0
    fi
    if [ "$DRY" = 1 ]; then say "would create $dir/ ($mode)"; return 0; fi
    mkdir -p "$dir"
    chmod "$mode" "$dir"
    say "created $dir/ ($mode)"
}

# put MODE SRC DEST: install SRC as DEST (atomically); prints installed / upgraded / unchanged.
put() {
    local mode=$1 src=$2 dest=$3 what
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        if [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then say "unchanged $dest"; return 0; fi
        what="chmod $mode"
    elif [ -e "$dest" ]; then
        what=upgraded
    else
        what=installed
    fi
    if [ "$DRY" = 1 ]; then say "would write $dest ($what, $mode)"; return 0; fi
    install -m "$mode" "$src" "$dest.tmp.$$"
    mv -f "$dest.tmp.$$" "$dest"
    say "$what $dest ($mode)"
    return 10   # "changed", for callers that care
}

# put_once MODE SRC DEST: install only if DEST is absent (site-owned files).
put_once() {
    local mode=$1 src=$2 dest=$3
    if [ -e "$dest" ]; then say "kept $dest (exists; local changes preserved)"; return 0; fi
    if [ "$DRY" = 1 ]; then say "would write $dest (installed, $mode)"; return 0; fi
    install -m "$mode" "$src" "$dest.tmp.$$"
    mv -f "$dest.tmp.$$" "$dest"
    say "installed $dest ($mode)"
}

changed() { local rc=0; "$@" || rc=$?; [ "$rc" = 10 ] && CHANGED=1; [ "$rc" = 0 ] || [ "$rc" = 10 ]; }

[ "$DRY" = 1 ] && say "dry run: nothing will be changed"
[ -n "$ROOT" ] && say "test root $ROOT: no systemctl$([ "$RUN_PIP" = 1 ] || echo ', no pip install')"

# --- directories ------------------------------------------------------------------
umask 022
mkdir_mode 0755 "$OPT"
mkdir_mode 0755 "$ETC"
mkdir_mode 0755 "$ETC/tls"                 # CA and client certificates (public)
mkdir_mode 0755 "$ETC/bundles"             # versioned model bundles
mkdir_mode 0700 "$CREDS"                   # LoadCredential= sources, root only
mkdir_mode 0700 "$CREDS/tls"               # optional TLS client key (LoadCredential=tls:...)
mkdir_mode 0755 "$UNIT_DIR"
mkdir_mode 0755 "$DROPIN_DIR"

# --- the agent: its own venv under /opt/edgewatch -----------------------------------
version_in_venv() {
    [ -x "$VENV/bin/python" ] || return 0
    "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("edgewatch"))' 2>/dev/null || true
}
if [ "$RUN_PIP" = 1 ]; then
    spec=$SOURCE
    [ "$LITERT" = 1 ] && spec="${SOURCE}[litert]"
    before=$(version_in_venv)
    if [ ! -x "$VENV/bin/python" ]; then
        run "$PYTHON" -m venv "$VENV"
    fi
    # Re-run = upgrade in place (pip always rebuilds a checkout). A wheel with
    # the version already installed would be skipped, so force that one
    # (edgewatch only, not its dependencies).
    run "$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade "$spec"
    if [ -f "$SOURCE" ]; then
        run "$VENV/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps "$SOURCE"
    fi
    if [ "$DRY" = 0 ]; then
        after=$(version_in_venv)
        [ -x "$VENV/bin/edge-agent" ] || die "pip finished but $VENV/bin/edge-agent is missing"
        if [ -z "$before" ]; then say "installed edgewatch $after in $VENV"
        elif [ "$before" != "$after" ]; then say "upgraded edgewatch $before -> $after in $VENV"
        else say "reinstalled edgewatch $after in $VENV"
        fi
        CHANGED=1
    fi
else
    say "skipped pip install into $VENV (--root without --pip)"
fi
changed put 0644 "$REPO/deploy/README.md" "$OPT/README.md"

# --- configuration --------------------------------------------------------------------
put_once 0644 "$REPO/deploy/agent.example.yaml" "$ETC/agent.yaml"
put 0644 "$REPO/deploy/agent.example.yaml" "$ETC/agent.yaml.example" || true

# --- model bundle (optional) -----------------------------------------------------------
if [ -n "$BUNDLE" ]; then
    # name-version from the manifest; falls back to the directory name.
    bname=$(python3 -c 'import json, re, sys
m = json.load(open(sys.argv[1]))
print(re.sub(r"[^A-Za-z0-9._-]", "_", "%s-%s" % (m.get("name", "bundle"), m.get("version", "0"))))' "$BUNDLE/manifest.json" 2>/dev/null) \
        || bname=$(basename "$BUNDLE")
    dest=$ETC/bundles/$bname
    if [ -d "$dest" ]; then
        say "kept $dest (bundle already deployed)"
    elif [ "$DRY" = 1 ]; then
        say "would copy $BUNDLE -> $dest/"
    else
        cp -r "$BUNDLE" "$dest.tmp.$$"
        chmod -R u=rwX,go=rX "$dest.tmp.$$"
        mv "$dest.tmp.$$" "$dest"
        say "installed $dest/"
    fi
    # Same layout as `edge-agent install-bundle` (agent/bundle_store.py): bundle.previous
    # names the bundle replaced, so `edge-agent rollback` can switch back to it.
    link=$ETC/bundle
    prev_link=$ETC/bundle.previous
    old=$(readlink "$link" 2>/dev/null || true)
    if [ "$old" = "bundles/$bname" ]; then
        say "unchanged $link -> bundles/$bname"
    elif [ -e "$link" ] && [ ! -L "$link" ]; then
        die "$link exists and is not a symlink; move it into $ETC/bundles/ first"
    elif [ "$DRY" = 1 ]; then
        say "would point $link -> bundles/$bname"
        [ -z "$old" ] || say "would point $prev_link -> $old"
    else
        ln -sfn "bundles/$bname" "$link.tmp.$$"
        mv -Tf "$link.tmp.$$" "$link"       # atomic switch
        say "switched $link -> bundles/$bname"
        if [ -n "$old" ]; then
            ln -sfn "$old" "$prev_link.tmp.$$"
            mv -Tf "$prev_link.tmp.$$" "$prev_link"
            say "pointed $prev_link -> $old (edge-agent rollback goes there)"
        fi
        BUNDLE_SWITCHED=1
    fi
fi

# --- systemd unit ----------------------------------------------------------------------
changed put 0644 "$REPO/systemd/edgewatch-agent.service" "$UNIT"
put_once 0644 "$REPO/systemd/10-site.conf" "$DROPIN_DIR/10-site.conf"

if [ ! -s "$CREDS/mqtt_password" ]; then
    say "note: $CREDS/mqtt_password is missing or empty: the service will not start"
    say "      (243/CREDENTIALS) until it holds the broker password (type it, then Ctrl-D):"
    say "      sh -c 'umask 077; cat > $CREDS/mqtt_password'"
fi

if [ "$SYSTEMD" = 0 ]; then
    say "skipped systemctl (--root)"
elif [ ! -d /run/systemd/system ]; then
    # Not booted with systemd (chroot or image build): enabling works offline.
    say "systemd is not running here (chroot/image build): enable only, no start"
    run systemctl enable "$SERVICE"
else
    run systemctl daemon-reload
    active=0
    if [ "$DRY" = 0 ] && systemctl is-active --quiet "$SERVICE"; then active=1; fi
    if [ "$START" = 0 ]; then
        run systemctl enable "$SERVICE"
    elif [ ! -s "$CREDS/mqtt_password" ] && [ "$DRY" = 0 ]; then
        run systemctl enable "$SERVICE"
        say "not starting $SERVICE until $CREDS/mqtt_password exists; then: systemctl start $SERVICE"
    elif [ "$active" = 1 ] && [ "$CHANGED" = 1 ]; then
        run systemctl enable "$SERVICE"
        run systemctl restart "$SERVICE"
    elif [ "$active" = 1 ] && [ "$BUNDLE_SWITCHED" = 1 ]; then
        run systemctl reload "$SERVICE"      # hot reload picks up the new bundle
    else
        run systemctl enable --now "$SERVICE"
    fi
fi
say "done"
