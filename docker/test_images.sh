#!/usr/bin/env bash
# End-to-end check of the images with podman (no Docker engine needed): build the monitor and peer images from a
# local base image and a host wheelhouse, start a monitor and two peers as containers on a podman network, and pass
# when the monitor's /api/status shows both peers alive while the swarm's epoch advances. Cleans up on exit.
#
# Usage: docker/test_images.sh [BUILD_CONTEXT]          (run as root; BUILD_CONTEXT defaults to the repository)
# Environment:
#   ALBERT_BUILD_CACHE   rootfs, wheelhouse and containers.conf live here (default ~/.cache/albert-swarm-docker)
#   ALBERT_BASE_IMAGE    base image to build on (default localhost/bookworm-py:base, made with debootstrap if absent)
#   ALBERT_TEST_TIMEOUT  seconds to wait for the swarm to train (default 600)
#   ALBERT_TEST_EPOCHS   epochs the swarm must advance with both peers alive (default 2)
#   ALBERT_KEEP_IMAGES   1 keeps the built images (default; later runs reuse their layers), 0 removes them
#   ALBERT_TEST_COMPOSE  1 also runs docker/compose.yaml's monitor and 2 peers through docker-compose on podman's
#                        API socket (local images; Prometheus/Grafana left out: their images cannot be pulled offline)
#   PYTHON               Python with pip used to fill the wheelhouse (default python3)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CONTEXT=$(cd "${1:-$REPO}" && pwd)
CACHE=${ALBERT_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/albert-swarm-docker}
BASE=${ALBERT_BASE_IMAGE:-localhost/bookworm-py:base}
TIMEOUT=${ALBERT_TEST_TIMEOUT:-600}
EPOCHS=${ALBERT_TEST_EPOCHS:-2}
PYTHON=${PYTHON:-python3}
TAG="test"
PREFIX=albert-test-$$
NETWORK=$PREFIX-net
MONITOR=$PREFIX-monitor
PEERS=("$PREFIX-peer1" "$PREFIX-peer2")
STARTED=$SECONDS

log() { printf '[%4ds] %s\n' "$((SECONDS - STARTED))" "$*"; }
fail() { log "FAIL: $*"; exit 1; }

# --- podman settings this kind of host needs (see machine notes): runc, ulimits, chroot isolation for builds ---
setup_podman() {
    command -v podman >/dev/null || fail "podman is not installed (apt-get install podman buildah runc)"
    mkdir -p "$CACHE"
    if [ -z "${CONTAINERS_CONF:-}" ]; then
        export CONTAINERS_CONF=$CACHE/containers.conf
        cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
EOF
    fi
    export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
}

# --- a base image with python3 when no registry can be reached: debootstrap + podman import ---
ensure_base_image() {
    if podman image exists "$BASE"; then
        log "base image $BASE present"
        return
    fi
    [ "$BASE" = localhost/bookworm-py:base ] || fail "base image $BASE not found"
    command -v debootstrap >/dev/null || fail "debootstrap is needed to make $BASE"
    if [ ! -x "$CACHE/rootfs/usr/bin/python3" ]; then
        log "debootstrap bookworm into $CACHE/rootfs"
        rm -rf "$CACHE/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$CACHE/rootfs" \
            >"$CACHE/debootstrap.log" 2>&1 || fail "debootstrap failed, see $CACHE/debootstrap.log"
    fi
    tar -C "$CACHE/rootfs" -c . | podman import - "$BASE" >/dev/null
    log "imported $BASE"
}

# --- wheels of every dependency in pyproject.toml (plus CPU torch), refreshed when the dependency list changes ---
ensure_wheelhouse() {
    local wheels=$CACHE/wheels requirements=$CACHE/requirements.txt constraints=$CACHE/constraints.txt
    mkdir -p "$wheels"
    "$PYTHON" -c "import sys, tomllib
print('\n'.join(tomllib.load(open(sys.argv[1], 'rb'))['project']['dependencies']))" \
        "$CONTEXT/pyproject.toml" >"$requirements.new"
    # The host's torch (CPU build on a machine without GPU) stands in for the CUDA base's torch.
    "$PYTHON" -c "import torch; print('torch==' + torch.__version__)" >>"$requirements.new" 2>/dev/null || true
    printf 'setuptools>=68\nwheel\n' >>"$requirements.new"
    if cmp -s "$requirements.new" "$requirements" && [ -n "$(ls -A "$wheels")" ]; then
        log "wheelhouse $wheels up to date ($(find "$wheels" -name "*.whl" | wc -l) wheels)"
        rm "$requirements.new"
        return
    fi
    log "filling wheelhouse $wheels"
    # Pin what the host's environment already runs (a combination known to work), minus editable/URL installs.
    "$PYTHON" -m pip freeze 2>/dev/null | grep -vE '^(-e |#)| @ ' >"$constraints" || true
    "$PYTHON" -m pip wheel -q --wheel-dir "$wheels" --find-links "$wheels" -c "$constraints" -r "$requirements.new" \
        >"$CACHE/wheelhouse.log" 2>&1 || fail "pip wheel failed, see $CACHE/wheelhouse.log"
    mv "$requirements.new" "$requirements"
}

build_images() {
    local target
    for target in monitor peer; do
        log "building localhost/albert-swarm-$target:$TAG"
        podman build --format docker -f "$REPO/docker/Dockerfile" --target "$target" \
            --build-arg BASE="$BASE" --build-context wheelhouse="$CACHE/wheels" --build-arg PIP_NO_INDEX=1 \
            -t "localhost/albert-swarm-$target:$TAG" "$CONTEXT" >"$CACHE/build-$target.log" 2>&1 \
            || { tail -n 30 "$CACHE/build-$target.log"; fail "building the $target image failed"; }
    done
}

cleanup() {
    local status=$?
    if [ $status -ne 0 ]; then
        for name in "$MONITOR" "${PEERS[@]}"; do
            podman container exists "$name" 2>/dev/null || continue
            echo "----- last lines of $name -----"
            podman logs --tail 25 "$name" 2>&1 || true
        done
    fi
    podman rm -f -v -t 5 "$MONITOR" "${PEERS[@]}" >/dev/null 2>&1 || true
    podman network rm -f "$NETWORK" >/dev/null 2>&1 || true
    if [ -n "${COMPOSE_FILE_USED:-}" ]; then
        docker-compose -p "$PROJECT" -f "$COMPOSE_FILE_USED" down -v -t 5 >/dev/null 2>&1 || true
    fi
    [ -z "${SERVICE_PID:-}" ] || kill "$SERVICE_PID" 2>/dev/null || true
    if [ "${ALBERT_KEEP_IMAGES:-1}" = 0 ]; then
        podman rmi -f "localhost/albert-swarm-monitor:$TAG" "localhost/albert-swarm-peer:$TAG" >/dev/null 2>&1 || true
    fi
    log "cleaned up (exit status $status)"
}

# The swarm is small and the machine may be busy: tiny model, small global batch, quick matchmaking, one thread.
RUN_SETTINGS=(
    -e ALBERT_RUN_ID=docker-test -e ALBERT_MODEL=tiny -e ALBERT_TARGET_BATCH_SIZE=64
    -e ALBERT_MATCHMAKING_TIME=3 -e ALBERT_AVERAGING_TIMEOUT=60 -e ALBERT_TORCH_THREADS=1
)

# Print one field of the monitor's /api/status (fetched inside the monitor container: no published ports needed).
status_field() {
    podman exec "$MONITOR" python -c "import json, sys, urllib.request
status = json.load(urllib.request.urlopen('http://127.0.0.1:8080/api/status', timeout=5))
print(' '.join(str(status[key]) for key in sys.argv[1:]))" "$@" 2>/dev/null
}

start_swarm() {
    podman network create "$NETWORK" >/dev/null
    podman run -d --name "$MONITOR" --network "$NETWORK" --shm-size 512m "${RUN_SETTINGS[@]}" \
        -e ALBERT_CHECKPOINT_EVERY=0 "localhost/albert-swarm-monitor:$TAG" >/dev/null
    log "monitor container started; waiting for its /api/status"
    local deadline=$((SECONDS + 180))
    until status_field run_id >/dev/null; do
        [ "$(podman inspect -f '{{.State.Running}}' "$MONITOR")" = true ] || fail "the monitor exited"
        [ $SECONDS -lt $deadline ] || fail "the monitor did not answer /api/status within 180 s"
        sleep 2
    done
    # Exactly what a volunteer is given: the join string; every run-wide setting comes from the signed manifest.
    JOIN=$(podman exec "$MONITOR" cat /data/join.txt)
    [ -n "$JOIN" ] || fail "the monitor wrote no join string"
    log "monitor up; join string: $JOIN"
    local peer
    for peer in "${PEERS[@]}"; do
        podman run -d --name "$peer" --network "$NETWORK" --shm-size 512m -e ALBERT_JOIN="$JOIN" \
            -e ALBERT_BATCH_SIZE=8 -e ALBERT_TORCH_THREADS=1 "localhost/albert-swarm-peer:$TAG" >/dev/null
    done
    log "two peer containers started"
}

# Pass once both peers are alive and the swarm has advanced EPOCHS epochs since that was first seen.
wait_for_training() {
    local deadline=$((SECONDS + TIMEOUT)) first_epoch="" line epoch alive loss
    while [ $SECONDS -lt $deadline ]; do
        for name in "$MONITOR" "${PEERS[@]}"; do
            [ "$(podman inspect -f '{{.State.Running}}' "$name")" = true ] || fail "$name exited"
        done
        if line=$(status_field epoch alive_peers loss samples_per_second); then
            read -r epoch alive loss rate <<<"$line"
            if [ "$alive" = 2 ]; then
                first_epoch=${first_epoch:-$epoch}
                log "status: epoch $epoch, alive_peers $alive, loss $loss, samples/s $rate"
                if [ $((epoch - first_epoch)) -ge "$EPOCHS" ]; then
                    log "the swarm advanced from epoch $first_epoch to $epoch with 2 peers alive"
                    return 0
                fi
            else
                log "status: epoch $epoch, alive_peers $alive (waiting for 2)"
            fi
        fi
        sleep 5
    done
    fail "no 2-peer training progress within ${TIMEOUT} s"
}

check_containers() {
    local name
    for name in "$MONITOR" "${PEERS[0]}"; do
        podman healthcheck run "$name" >/dev/null 2>&1 || fail "the HEALTHCHECK of $name reports unhealthy"
        [ "$(podman exec "$name" id -u)" = 10001 ] || fail "$name does not run as the non-root user 10001"
    done
    log "HEALTHCHECKs pass (monitor /healthz, peer /metrics); both run as uid 10001"
    # Graceful stop: SIGTERM must end a peer well before podman's 30 s SIGKILL (exit 137).
    local before=$SECONDS code
    podman stop -t 30 "${PEERS[1]}" >/dev/null
    code=$(podman inspect -f '{{.State.ExitCode}}' "${PEERS[1]}")
    [ "$code" != 137 ] || fail "${PEERS[1]} ignored SIGTERM and was killed"
    log "SIGTERM stopped ${PEERS[1]} in $((SECONDS - before)) s with exit code $code"
}

# compose.yaml as shipped, minus what cannot run offline: local images instead of builds, no published ports (this
# host is shared), no Prometheus/Grafana, and service_started instead of service_healthy (podman runs no health
# timers without systemd). The peers' entrypoint, the shared join.txt and the ALBERT_* wiring stay as shipped.
write_offline_compose() {
    "$PYTHON" - "$REPO/docker/compose.yaml" "$1" "$TAG" <<'EOF'
import sys
import yaml

compose = yaml.safe_load(open(sys.argv[1]))
for name in ("prometheus", "grafana"):
    del compose["services"][name]
    del compose["volumes"][f"{name}-data"]
for name in ("monitor", "peer"):
    service = compose["services"][name]
    del service["build"]
    service.pop("ports", None)
    service.pop("healthcheck", None)
    service["image"] = f"localhost/albert-swarm-{name}:{sys.argv[3]}"
    service["environment"]["ALBERT_TORCH_THREADS"] = "1"
# run-wide settings to the monitor only: the peers adopt them from its manifest through the join string
compose["services"]["monitor"]["environment"].update(
    ALBERT_RUN_ID="compose-test", ALBERT_TARGET_BATCH_SIZE="64", ALBERT_MATCHMAKING_TIME="3", ALBERT_CHECKPOINT_EVERY="0"
)
compose["services"]["peer"]["depends_on"] = {"monitor": {"condition": "service_started"}}
yaml.safe_dump(compose, open(sys.argv[2], "w"), sort_keys=False)
EOF
}

compose_check() {
    command -v docker-compose >/dev/null || fail "ALBERT_TEST_COMPOSE=1 needs docker-compose (apt: docker-compose)"
    local dir=$CACHE/compose-test
    mkdir -p "$dir"
    PROJECT=albertcompose$$
    COMPOSE_FILE_USED=$dir/compose.yaml
    write_offline_compose "$COMPOSE_FILE_USED"
    rm -f "$dir/podman.sock"
    podman system service --time=0 "unix://$dir/podman.sock" >"$dir/service.log" 2>&1 &
    SERVICE_PID=$!
    export DOCKER_HOST=unix://$dir/podman.sock
    local deadline=$((SECONDS + 30))
    until [ -S "$dir/podman.sock" ]; do
        [ $SECONDS -lt $deadline ] || fail "podman's API socket did not appear"
        sleep 1
    done
    docker-compose -p "$PROJECT" -f "$COMPOSE_FILE_USED" up -d --scale peer=2 >"$dir/up.log" 2>&1 \
        || { cat "$dir/up.log"; fail "docker-compose up failed"; }
    MONITOR=${PROJECT}_monitor_1
    PEERS=("${PROJECT}_peer_1" "${PROJECT}_peer_2")
    log "compose: monitor and 2 peers up through docker-compose"
    wait_for_training
    docker-compose -p "$PROJECT" -f "$COMPOSE_FILE_USED" stop >/dev/null 2>&1
    local name code
    for name in "${PEERS[@]}" "$MONITOR"; do
        code=$(podman inspect -f '{{.State.ExitCode}}' "$name")
        [ "$code" != 137 ] || fail "$name was killed: it did not stop within compose's stop_grace_period"
    done
    log "compose: docker-compose stop ended every service before its grace period"
}

# One function, so bash has read the whole script before it starts (editing it mid-run cannot derail it).
main() {
    trap cleanup EXIT
    setup_podman
    ensure_base_image
    ensure_wheelhouse
    build_images
    log "images built"
    start_swarm
    wait_for_training
    check_containers
    if [ "${ALBERT_TEST_COMPOSE:-0}" = 1 ]; then
        compose_check
    fi
    log "PASS in $((SECONDS - STARTED)) s"
}

main "$@"
