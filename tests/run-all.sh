#!/usr/bin/env bash
# The test command: run the whole suite on a fresh Debian-like machine.
#
# Some tests drive system tools for real (network namespaces, chromium, promtool, shellcheck, docker-compose, openssl,
# podman) and skip when one is missing, so a plain `pytest` on a fresh machine silently runs part of the suite. This
# script first makes sure every such tool is there: it installs the missing ones with apt-get when it can (root, or
# passwordless sudo), and otherwise stops at once, naming what is missing and the one command that installs it.
# Then it makes the venv, installs torch and the project with its test extra, and runs pytest.
#
#   tests/run-all.sh [--dry-run] [PYTEST_ARGS...]
#
#   --dry-run            check the tools and print every step instead of running it
#   PYTEST_ARGS          passed to `python -m pytest` (e.g. -m "not slow" for the quick loop)
#   ALBERT_VENV          the venv to make and use (default .venv)
#   ALBERT_ALLOW_SKIPS=1 go on without the missing tools (their tests skip, saying why)
#   ALBERT_DOCKER_E2E=1  as root, also build and run the images (tests/docker/test_docker_images.py, ~30 min)
#
# Skips that remain, by design (docs/testing.md): the soak (ALBERT_CHAOS_SOAK=1, by hand), the RusLit test (needs
# ../shared/corpora/ruslit, not redistributable), the container test unless ALBERT_DOCKER_E2E=1 (half an hour of
# image builds), and, when not run as root, the chaos suite.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
VENV=${ALBERT_VENV:-.venv}

say() { printf 'tests/run-all.sh: %s\n' "$*" >&2; }
run() {  # print the step; run it unless --dry-run
  say "+ $(printf '%q ' "$@")"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}
is_root() { [ "$(id -u)" = 0 ]; }
container_test() { is_root && [ "${ALBERT_DOCKER_E2E:-0}" = 1 ]; }  # opt-in: it takes half an hour

# command the tests run -> the Debian package that provides it
TOOLS=(
  "ip iproute2" "tc iproute2" "iptables iptables" "ps procps" "chromium chromium" "shellcheck shellcheck"
  "promtool prometheus" "docker-compose docker-compose" "openssl openssl" "jq jq" "xxd xxd" "sha256sum coreutils"
)
# the container test builds and runs the images with rootful podman, so its tools matter only as root
CONTAINER_TOOLS=("podman podman" "buildah buildah" "runc runc" "crun crun" "debootstrap debootstrap"
  "slirp4netns slirp4netns" "fuse-overlayfs fuse-overlayfs" "newuidmap uidmap")
CONTAINER_EXTRA_PACKAGES="netavark aardvark-dns"

has() {
  case "$1" in
    chromium) command -v chromium >/dev/null || command -v chromium-browser >/dev/null ;;
    *) command -v "$1" >/dev/null ;;
  esac
}

missing_packages() {  # prints "package (command)" for every tool absent here
  local entry tool package
  local entries=("${TOOLS[@]}")
  if container_test; then entries+=("${CONTAINER_TOOLS[@]}"); fi
  for entry in "${entries[@]}"; do
    tool=${entry% *}
    package=${entry#* }
    has "$tool" || printf '%s (%s)\n' "$package" "$tool"
  done
  # `python3 -m venv` needs ensurepip, which Debian ships apart from python3
  if ! command -v python3 >/dev/null; then
    printf '%s\n' 'python3 (python3)' 'python3-venv (python3 -m venv)'
  elif ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    printf '%s\n' 'python3-venv (python3 -m venv)'
  fi
}

install_or_stop() {
  local missing packages apt
  missing=$(missing_packages)
  [ -z "$missing" ] && return 0
  packages=$(printf '%s\n' "$missing" | cut -d' ' -f1 | sort -u | tr '\n' ' ')
  if printf '%s\n' "$missing" | grep -q '^podman '; then packages+="$CONTAINER_EXTRA_PACKAGES "; fi
  apt=""
  if command -v apt-get >/dev/null; then
    if is_root; then apt="apt-get"; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then apt="sudo apt-get"; fi
  fi
  if [ -n "$apt" ]; then
    say "installing the system tools the tests drive: ${packages% }"
    run $apt update -qq
    # shellcheck disable=SC2086  # one word per package
    run env DEBIAN_FRONTEND=noninteractive $apt install -y -qq --no-install-recommends $packages
    return 0
  fi
  say "missing system tools the tests drive:"
  printf '%s\n' "$missing" | sed 's/^/  /' >&2
  say "install them (Debian package names) with:"
  printf '  sudo apt-get install -y --no-install-recommends %s\n' "${packages% }" >&2
  if [ "${ALBERT_ALLOW_SKIPS:-0}" = 1 ]; then
    say "ALBERT_ALLOW_SKIPS=1: going on; the tests that need them will skip"
    return 0
  fi
  say "then run tests/run-all.sh again (or set ALBERT_ALLOW_SKIPS=1 to let those tests skip)"
  exit 1
}

install_or_stop
if container_test; then
  export ALBERT_DOCKER_E2E=1
elif ! is_root; then
  say "note: not root, so the chaos suite (network namespaces) and the container test skip; run as root to include them"
fi

# --- the venv, torch, the project with its test extra, and every test ---
if [ ! -x "$VENV/bin/python" ]; then run python3 -m venv "$VENV"; fi
say "+ . $VENV/bin/activate"
if [ "$DRY_RUN" = 0 ]; then
  # shellcheck disable=SC1091  # made just above
  . "$VENV/bin/activate"
fi
run pip install torch==2.13.0
run pip install -e '.[test]'
run python -m pytest "$@"
