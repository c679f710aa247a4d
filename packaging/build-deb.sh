#!/usr/bin/env bash
# Builds the .deb: `cargo deb` (extra arguments are passed on, e.g. --locked), then adds
# DEBIAN/md5sums, which cargo-deb does not write, so `dpkg --verify dlms-bridge` and debsums can
# check the installed files. Conffiles are left out of md5sums, as dh_md5sums does (dpkg tracks
# their checksums in its conffiles database). Prints the package's path as its last line.
# Needs dpkg-deb and md5sum; run it as root or under fakeroot so file owners stay root.
set -euo pipefail
cd "$(dirname "$0")/.."

# cargo-deb prints the path of the package it wrote as its last line of stdout.
deb=$(cargo deb "$@" | tail -n 1)
[ -f "$deb" ] || { echo "build-deb: no package at '$deb'" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -R "$deb" "$work/root"
(
    cd "$work/root"
    conffiles=DEBIAN/conffiles
    find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\./||' | LC_ALL=C sort |
        while IFS= read -r f; do
            if [ -f "$conffiles" ] && grep -qxF "/$f" "$conffiles"; then
                continue
            fi
            md5sum "$f"
        done >DEBIAN/md5sums
    chmod 644 DEBIAN/md5sums
)
dpkg-deb --root-owner-group -Zxz -b "$work/root" "$deb" >/dev/null
echo "$deb"
