#!/usr/bin/env bash
# Builds the .deb with cargo-deb and checks it the way an operator will use it: contents,
# conffiles and dependencies; install with dpkg on this machine; check-config on the installed
# config (as root and as the service user); systemd-analyze verify on the installed unit;
# ownership and permissions; an upgrade that keeps the queue and a locally edited config;
# remove (config and queue kept) and purge (both gone).
#
# Needs root (dpkg -i). Installs cargo-deb and systemd-analyze when missing. Idempotent: a
# dlms-bridge left installed by an earlier run is purged first.
# Set DEB_CHECK_PACKAGE=path/to.deb to check an existing package instead of building one. (Not
# DLMS_BRIDGE_*: every such variable is a config override, and an unknown key is an error.)
set -euo pipefail
cd "$(dirname "$0")/.."

PKG=dlms-bridge
BIN=/usr/bin/dlms-bridge
CONF_DIR=/etc/dlms-bridge
CONF=$CONF_DIR/config.toml
UNIT=/usr/lib/systemd/system/dlms-bridge.service
STATE_DIR=/var/lib/dlms-bridge
CARGO_DEB_VERSION=3.8.0

step() { echo "== deb-check: $*"; }
fail() {
    echo "deb-check: FAILED: $*" >&2
    exit 1
}
trap 'echo "deb-check: FAILED: command at line $LINENO exited with $?" >&2' ERR

# owner:group mode of a path, e.g. "root:dlms-bridge 640".
perms() { stat -c '%U:%G %a' "$1"; }
expect_perms() {
    local got
    got=$(perms "$2") || fail "$2 does not exist"
    [ "$got" = "$1" ] || fail "$2 is '$got', expected '$1'"
}

[ "$(id -u)" -eq 0 ] || fail "must run as root (it installs and purges the package)"

apt_updated=false
apt_install() {
    if ! $apt_updated; then
        apt-get update -qq
        apt_updated=true
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

step "prerequisites"
dpkg -s adduser >/dev/null 2>&1 || apt_install adduser
command -v systemd-analyze >/dev/null || apt_install systemd
if [ -z "${DEB_CHECK_PACKAGE:-}" ] && ! cargo deb --version >/dev/null 2>&1; then
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi

if dpkg -s "$PKG" >/dev/null 2>&1; then
    step "purging a $PKG left installed by an earlier run"
    dpkg -P "$PKG" >/dev/null
fi

if [ -n "${DEB_CHECK_PACKAGE:-}" ]; then
    deb=$DEB_CHECK_PACKAGE
else
    step "cargo deb (one release build: LTO, stripped)"
    # cargo-deb prints the path of the package it wrote as its last line of stdout.
    deb=$(cargo deb --locked | tail -n 1)
fi
[ -f "$deb" ] || fail "no package at '$deb'"
echo "package: $deb"

step "dpkg-deb -c: files and modes"
contents=$(dpkg-deb -c "$deb")
echo "$contents"
has_file() {
    # dpkg-deb -c lines: mode owner/group size date time ./path
    echo "$contents" | awk -v p="./${1#/}" '$6 == p { print $1; found = 1 } END { exit !found }'
}
for f in "$BIN" "$CONF" "$UNIT" /usr/share/doc/dlms-bridge/README.md \
    /usr/share/doc/dlms-bridge/OPERATIONS.md /usr/share/doc/dlms-bridge/CONFIG.md; do
    has_file "$f" >/dev/null || fail "$f missing from the package"
done
[ "$(has_file "$BIN")" = "-rwxr-xr-x" ] || fail "$BIN is not mode 755 in the package"
[ "$(has_file "$CONF")" = "-rw-r-----" ] || fail "$CONF is not mode 640 in the package"
dpkg-deb --fsys-tarfile "$deb" | tar -xO "./${CONF#/}" | cmp -s - config/dlms-bridge.toml ||
    fail "$CONF in the package differs from config/dlms-bridge.toml"

step "dpkg-deb -I: control, conffiles, maintainer scripts"
dpkg-deb -I "$deb"
depends=$(dpkg-deb -f "$deb" Depends)
echo "$depends" | grep -qw adduser || fail "Depends lacks adduser: $depends"
echo "$depends" | grep -qw libc6 || fail "Depends lacks libc6 (\$auto did not resolve): $depends"
dpkg-deb -I "$deb" conffiles | grep -qx "$CONF" || fail "$CONF is not a conffile"
for s in postinst prerm postrm; do
    dpkg-deb -I "$deb" "$s" >/dev/null || fail "maintainer script $s missing"
done
if dpkg-deb -I "$deb" postinst | grep -v '^[[:space:]]*#' |
    grep -Eq 'systemctl.*[[:space:]](enable|start)[[:space:]]|deb-systemd-helper.*enable|deb-systemd-invoke.*start'; then
    fail "postinst enables or starts the service; install must not (see docs/OPERATIONS.md)"
fi

step "dpkg -i"
dpkg -i "$deb"
[ -x "$BIN" ] || fail "$BIN not installed"

step "service user and permissions"
getent group dlms-bridge >/dev/null || fail "group dlms-bridge not created"
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd dlms-bridge) ||
    fail "user dlms-bridge not created"
[ "$uid" -lt 1000 ] || fail "dlms-bridge is not a system user (uid $uid)"
[ "$(getent group dlms-bridge | cut -d: -f3)" = "$gid" ] || fail "dlms-bridge's primary group is not dlms-bridge"
[ "$home" = "$STATE_DIR" ] || fail "dlms-bridge's home is '$home', expected $STATE_DIR"
case "$shell" in */nologin | */false) ;; *) fail "dlms-bridge has a login shell: $shell" ;; esac
expect_perms "root:dlms-bridge 640" "$CONF"
expect_perms "root:dlms-bridge 750" "$CONF_DIR"
expect_perms "dlms-bridge:dlms-bridge 750" "$STATE_DIR"
expect_perms "root:root 644" "$UNIT"
if compgen -G "/etc/systemd/system/*.wants/dlms-bridge.service" >/dev/null; then
    fail "the service was enabled on install; it must not be"
fi

step "check-config on the installed config"
"$BIN" --config "$CONF" check-config
# The service user must be able to read its config (0640 root:dlms-bridge) and nobody else.
runuser -u dlms-bridge -- "$BIN" --config "$CONF" check-config ||
    fail "check-config fails as the service user (permissions?)"
if runuser -u nobody -- cat "$CONF" >/dev/null 2>&1; then
    fail "$CONF is readable by other users; it holds the access token"
fi

step "systemd-analyze verify"
verify_out=$(systemd-analyze verify "$UNIT" 2>&1) || {
    echo "$verify_out" >&2
    fail "systemd-analyze verify rejected $UNIT"
}
# Warnings do not change the exit code; any that mention our unit count as failures.
if echo "$verify_out" | grep -i 'dlms-bridge'; then
    fail "systemd-analyze verify warns about $UNIT"
fi
echo "${verify_out:-(no findings)}"

step "upgrade (reinstall) keeps the queue and a locally edited config"
echo "queue placeholder" >"$STATE_DIR/queue.db"
chown dlms-bridge:dlms-bridge "$STATE_DIR/queue.db"
echo "# edited by deb-check" >>"$CONF"
dpkg -i --force-confold "$deb"
[ -f "$STATE_DIR/queue.db" ] || fail "upgrade lost $STATE_DIR/queue.db"
grep -q "edited by deb-check" "$CONF" || fail "upgrade replaced the edited $CONF"
expect_perms "root:dlms-bridge 640" "$CONF"
"$BIN" --config "$CONF" check-config >/dev/null

step "dpkg -r: binary gone, config and queue kept"
dpkg -r "$PKG"
[ ! -e "$BIN" ] || fail "$BIN still present after remove"
[ ! -e "$UNIT" ] || fail "$UNIT still present after remove"
[ -f "$CONF" ] || fail "remove deleted the conffile $CONF"
[ -f "$STATE_DIR/queue.db" ] || fail "remove deleted the queue"

step "dpkg -P: config and state gone, user kept"
dpkg -P "$PKG"
[ ! -e "$CONF_DIR" ] || fail "$CONF_DIR still present after purge"
[ ! -e "$STATE_DIR" ] || fail "$STATE_DIR still present after purge"
dpkg -s "$PKG" >/dev/null 2>&1 && fail "$PKG still known to dpkg after purge"
getent passwd dlms-bridge >/dev/null || fail "purge removed the system user (it should stay)"

step "ok"
