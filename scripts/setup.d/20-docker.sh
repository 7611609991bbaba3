#!/usr/bin/env bash
# Tier1 (Docker) and Tier2 (gVisor): installs docker.io, runsc and busybox-static when missing,
# starts dockerd without systemd when it is not running and registers runsc as a Docker runtime
# named `runsc`. Idempotent; prints each step.
#
# runsc runs with --platform=ptrace (KVM guests hang on this kind of machine) through a small
# wrapper, /usr/local/lib/symbiont/runsc: the packaged runsc (20221219) decides it is in the
# host's network namespace when /proc/sys/net/core/rmem_default exists, which kernels >= 6.x
# expose in every namespace (gVisor issue #10704), and then refuses its own network stack
# (netstack). The wrapper runs runsc in a private mount namespace with /proc/sys/net hidden,
# so the check answers correctly and sandboxes keep gVisor's netstack. See
# docs/sandbox-docker.md.
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
  if ! wait_until 120 0.5 docker_up; then
    echo "    dockerd did not come up within 60 s; see /var/log/dockerd.log" >&2
    tail -n 20 /var/log/dockerd.log >&2 || true
    exit 1
  fi
  echo "    dockerd is up"
fi

runsc_bin="$(command -v runsc || echo /usr/bin/runsc)"
wrapper=/usr/local/lib/symbiont/runsc
want_wrapper="#!/bin/sh
# Installed by symbiont scripts/setup.d/20-docker.sh: runs $runsc_bin with /proc/sys/net hidden
# in a private mount namespace, working around runsc's root-netns check (gVisor issue #10704).
exec unshare --mount --propagation private /bin/sh -c 'mount -t tmpfs -o size=4k,mode=555 symbiont-nonet /proc/sys/net && exec $runsc_bin \"\$@\"' runsc \"\$@\""
if [ -x "$wrapper" ] && [ "$(cat "$wrapper")" = "$want_wrapper" ]; then
  echo "    runsc wrapper present: $wrapper"
else
  echo "    installing runsc wrapper $wrapper"
  mkdir -p "$(dirname "$wrapper")"
  printf '%s\n' "$want_wrapper" > "$wrapper.tmp"
  chmod 755 "$wrapper.tmp"
  mv "$wrapper.tmp" "$wrapper"
fi
runsc_path="$wrapper"
echo "    registering runsc ($runsc_path --platform=ptrace) in /etc/docker/daemon.json"
mkdir -p /etc/docker
changed=$(python3 - "$runsc_path" <<'EOF'
import json, os, sys
path = "/etc/docker/daemon.json"
conf = {}
if os.path.exists(path) and os.path.getsize(path) > 0:
    with open(path) as f:
        conf = json.load(f)
want = {"path": sys.argv[1], "runtimeArgs": ["--platform=ptrace"]}
if conf.get("runtimes", {}).get("runsc") == want:
    print("no")
    sys.exit(0)
conf.setdefault("runtimes", {})["runsc"] = want
conf["runtimes"].pop("runsc-exp", None)
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
  if ! wait_until 40 0.25 runsc_listed; then
    echo "    dockerd did not pick up the runsc runtime; restart dockerd" >&2
    exit 1
  fi
  echo "    runsc registered"
else
  echo "    runsc already registered with these flags"
fi
