#!/usr/bin/env bash
# Builds the .deb with cargo-deb and checks it the way an operator will use it: contents,
# conffiles and dependencies; install with dpkg on this machine; check-config on the installed
# config (as root and as the service user); systemd-analyze verify on the installed unit;
# ownership and permissions; an upgrade that keeps the queue and a locally edited config;
# remove (config and queue kept) and purge (both gone).
#
# Needs root (dpkg -i). Installs cargo-deb and systemd-analyze when missing.
#
# It PURGES dlms-bridge at the end, and first if it is already installed, which deletes
# /etc/dlms-bridge (config, token) and /var/lib/dlms-bridge (undelivered records). So on a machine
# where dlms-bridge is installed it refuses to run, listing what it would delete, unless
# DEB_CHECK_ALLOW_PURGE=1 is set (.ci/run sets it: CI machines are fresh).
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

# What a purge would delete, for the refusal message.
would_delete() {
    local d
    for d in "$CONF_DIR" "$STATE_DIR"; do
        if [ -e "$d" ]; then
            find "$d" -mindepth 1 -printf '  %p (%s bytes)\n' 2>/dev/null || true
            echo "  $d"
        fi
    done
}

if dpkg -s "$PKG" >/dev/null 2>&1 || [ -e "$CONF_DIR" ] || [ -e "$STATE_DIR" ]; then
    if [ "${DEB_CHECK_ALLOW_PURGE:-}" != 1 ]; then
        {
            echo "deb-check: dlms-bridge is installed (or has left files) on this machine."
            echo "deb-check installs and PURGES the package, which deletes:"
            would_delete
            echo "including the configuration (with the access token) and any records not yet"
            echo "delivered to ThingsBoard. Back them up, or run on a scratch machine."
            echo "To go ahead anyway: DEB_CHECK_ALLOW_PURGE=1 bash .ci/deb-check.sh"
        } >&2
        exit 1
    fi
    step "purging the installed $PKG (DEB_CHECK_ALLOW_PURGE=1); deleting:"
    would_delete
    if dpkg -s "$PKG" >/dev/null 2>&1; then
        dpkg -P "$PKG" >/dev/null
    fi
    rm -rf "$CONF_DIR" "$STATE_DIR"
fi

if [ -n "${DEB_CHECK_PACKAGE:-}" ]; then
    deb=$DEB_CHECK_PACKAGE
else
    step "packaging/build-deb.sh (cargo deb: one release build, LTO, stripped; + md5sums)"
    deb=$(bash packaging/build-deb.sh --locked | tail -n 1)
fi
[ -f "$deb" ] || fail "no package at '$deb'"
echo "package: $deb"

tmp_extract=$(mktemp -d)
trap 'rm -rf "$tmp_extract"' EXIT

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
md5s=$(dpkg-deb -I "$deb" md5sums) || fail "the package has no md5sums"
echo "$md5s" | grep -q "  usr/bin/dlms-bridge\$" || fail "md5sums does not list usr/bin/dlms-bridge"
echo "$md5s" | grep -q "  etc/dlms-bridge/config.toml\$" && fail "md5sums lists the conffile"
# Every file of the package is listed, with the right sum.
dpkg-deb -x "$deb" "$tmp_extract"
(cd "$tmp_extract" && echo "$md5s" | md5sum --quiet -c -) || fail "md5sums do not match the files"
n_files=$(find "$tmp_extract" -type f ! -path "$tmp_extract/etc/dlms-bridge/config.toml" | wc -l)
[ "$(echo "$md5s" | wc -l)" -eq "$n_files" ] || fail "md5sums lists $(echo "$md5s" | wc -l) files, the package has $n_files"
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

step "dpkg --verify (md5sums of the installed files)"
verify=$(dpkg --verify "$PKG") || fail "dpkg --verify failed: $verify"
[ -z "$verify" ] || fail "dpkg --verify reports changed files: $verify"

step "check-config on the installed config"
# The packaged default has no token: not ready to run, exit 2, naming the key.
rc=0
out=$("$BIN" --config "$CONF" check-config 2>&1) || rc=$?
echo "$out"
[ "$rc" -eq 2 ] || fail "check-config of the tokenless default exited $rc, expected 2"
echo "$out" | grep -q "thingsboard.access_token: is empty" || fail "check-config did not name the empty token"
# With a token, it passes as root, which checks as the service user by default.
out=$(DLMS_BRIDGE_THINGSBOARD__ACCESS_TOKEN=deb-check "$BIN" --config "$CONF" check-config) ||
    fail "check-config with a token failed"
echo "$out"
echo "$out" | grep -q "checked as user dlms-bridge" || fail "check-config as root did not check as dlms-bridge"
# The service user must be able to read its config (0640 root:dlms-bridge) and nobody else.
DLMS_BRIDGE_THINGSBOARD__ACCESS_TOKEN=deb-check runuser -u dlms-bridge -- "$BIN" --config "$CONF" check-config ||
    fail "check-config fails as the service user (permissions?)"
if runuser -u nobody -- cat "$CONF" >/dev/null 2>&1; then
    fail "$CONF is readable by other users; it holds the access token"
fi

step "import tb-gateway over the packaged default (migration step 2)"
fixture=tests/fixtures/tb-gateway
"$BIN" import tb-gateway "$fixture/config" --mosquitto "$fixture/mosquitto.conf"
cmp -s "$CONF.orig" config/dlms-bridge.toml || fail "$CONF.orig is not the packaged default"
expect_perms "root:dlms-bridge 640" "$CONF"
expect_perms "root:dlms-bridge 750" "$CONF_DIR/tb-gateway"
for f in "$CONF_DIR"/tb-gateway/*.json; do expect_perms "root:dlms-bridge 640" "$f"; done
grep -q "tb_gateway_file = \"$CONF_DIR/tb-gateway/mqtt.json\"" "$CONF" ||
    fail "the imported config does not use the copied connector file"
if grep -v "^#" "$CONF" | grep -q "$fixture"; then fail "the imported config refers to tb-gateway's directory"; fi
# A second import refuses to overwrite the now modified config.
if "$BIN" import tb-gateway "$fixture/config" 2>/dev/null; then
    fail "import overwrote a modified config without --force"
fi
"$BIN" --config "$CONF" check-config || fail "check-config of the imported config failed"

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
