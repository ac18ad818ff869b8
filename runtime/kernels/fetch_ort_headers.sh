#!/usr/bin/env bash
# Fetch the ONNX Runtime C API headers (not on PyPI) from Debian trixie's libonnxruntime-dev (1.21)
# into a build cache, without touching the system's apt setup: a private sources list, private
# state/cache directories and `apt-get download` (no install, no root needed for the system dirs).
#
#   runtime/kernels/fetch_ort_headers.sh [DEST]    (default: runtime/kernels/_build/ort-headers)
#
# Prints DEST on success. Exits non-zero when the package cannot be fetched (no network, no apt):
# the build then skips the native kernel and models use the in-model ONNX function instead.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DEST="${1:-$HERE/_build/ort-headers}"
SUITE="${MODELSURGEON_ORT_DEB_SUITE:-trixie}"
MIRROR="${MODELSURGEON_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if [ -f "$DEST/onnxruntime_c_api.h" ]; then echo "$DEST"; exit 0; fi
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || { echo "fetch_ort_headers: needs apt-get and dpkg-deb" >&2; exit 2; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ms-ort-headers.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/state/lists/partial" "$WORK/cache/archives/partial" "$WORK/parts" "$WORK/prefs" "$WORK/pkg"
: > "$WORK/status"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
SIGNED=""
[ -f "$KEYRING" ] && SIGNED=" [signed-by=$KEYRING]"
echo "deb$SIGNED $MIRROR $SUITE main" > "$WORK/sources.list"

APT=(apt-get -q
     -o "Dir::Etc::SourceList=$WORK/sources.list" -o "Dir::Etc::SourceParts=$WORK/parts"
     -o "Dir::Etc::Preferences=$WORK/prefs/none" -o "Dir::Etc::PreferencesParts=$WORK/prefs"
     -o "Dir::State=$WORK/state" -o "Dir::State::Lists=$WORK/state/lists" -o "Dir::State::status=$WORK/status"
     -o "Dir::Cache=$WORK/cache" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root"
     -o "Acquire::Languages=none" -o "APT::Architecture=amd64" -o "APT::Architectures=amd64")
"${APT[@]}" update >"$WORK/update.log" 2>&1 || { tail -5 "$WORK/update.log" >&2; exit 3; }
(cd "$WORK/pkg" && "${APT[@]}" download libonnxruntime-dev >"$WORK/download.log" 2>&1) || { tail -5 "$WORK/download.log" >&2; exit 4; }
DEB="$(ls "$WORK"/pkg/*.deb | head -1)"
dpkg-deb -x "$DEB" "$WORK/x"
SRC="$(dirname "$(find "$WORK/x" -name onnxruntime_c_api.h | head -1)")"
[ -f "$SRC/onnxruntime_c_api.h" ] || { echo "fetch_ort_headers: no onnxruntime_c_api.h in $(basename "$DEB")" >&2; exit 5; }
mkdir -p "$DEST"
cp -r "$SRC"/. "$DEST"/
basename "$DEB" > "$DEST/SOURCE_PACKAGE"
echo "$DEST"
