#!/usr/bin/env bash
# Tier1 (Docker) and Tier2 (gVisor): installs docker.io, runsc and busybox-static when missing,
# starts dockerd without systemd when it is not running and registers runsc as a Docker runtime
# named `runsc`. Idempotent; prints each step.
#
# runsc flags: --platform=ptrace (KVM guests hang on this kind of machine) and --network=host:
# the packaged runsc (20221219) refuses its own netstack on kernels that expose
# net.core.rmem_default in every network namespace (gVisor issue #10704), so the sandbox uses
# the host kernel's stack INSIDE the container's own network namespace (Docker's `none` or the
# `symbiont` bridge), which keeps the isolation of that namespace. See docs/sandbox-docker.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

echo "    docker: packages"
apt_install docker.io runsc busybox-static iproute2 iptables util-linux python3

sock=/var/run/docker.sock
docker_up() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

if docker_up; then
  echo "    dockerd running (server $(docker version --format '{{.Server.Version}}'))"
else
  if [ -S "$sock" ] && [ -f /var/run/docker.pid ] && kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    echo "    dockerd process exists but does not answer yet; waiting for $sock"
  else
    echo "    starting dockerd (no systemd): dockerd >/var/log/dockerd.log 2>&1 &"
    nohup dockerd >/var/log/dockerd.log 2>&1 &
  fi
  for _ in $(seq 1 120); do
    docker_up && break
    sleep 0.5
  done
  if ! docker_up; then
    echo "    dockerd did not come up within 60 s; see /var/log/dockerd.log" >&2
    tail -n 20 /var/log/dockerd.log >&2 || true
    exit 1
  fi
  echo "    dockerd is up"
fi

runsc_path="$(command -v runsc || echo /usr/bin/runsc)"
echo "    registering runsc ($runsc_path --platform=ptrace --network=host) in /etc/docker/daemon.json"
mkdir -p /etc/docker
changed=$(python3 - "$runsc_path" <<'EOF'
import json, os, sys
path = "/etc/docker/daemon.json"
conf = {}
if os.path.exists(path) and os.path.getsize(path) > 0:
    with open(path) as f:
        conf = json.load(f)
want = {"path": sys.argv[1], "runtimeArgs": ["--platform=ptrace", "--network=host"]}
if conf.get("runtimes", {}).get("runsc") == want:
    print("no")
    sys.exit(0)
conf.setdefault("runtimes", {})["runsc"] = want
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(conf, f, indent=2)
    f.write("\n")
os.replace(tmp, path)
print("yes")
EOF
)
runsc_listed() { docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"'; }
if [ "$changed" = "yes" ] || ! runsc_listed; then
  echo "    reloading dockerd configuration (SIGHUP to pid $(cat /var/run/docker.pid))"
  kill -HUP "$(cat /var/run/docker.pid)"
  sleep 0.5
  for _ in $(seq 1 40); do
    runsc_listed && break
    sleep 0.25
  done
  if ! runsc_listed; then
    echo "    dockerd did not pick up the runsc runtime; restart dockerd" >&2
    exit 1
  fi
  echo "    runsc registered"
else
  echo "    runsc already registered with these flags"
fi
