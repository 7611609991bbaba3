#!/usr/bin/env bash
# After the suite: no sandbox may be left behind (processes, cgroups, containers, VMs).
set -uo pipefail
leaks=0
for d in /sys/fs/cgroup/*/symbiont /sys/fs/cgroup/unified/symbiont /sys/fs/cgroup/symbiont; do
  [ -d "$d" ] || continue
  n=$(find "$d" -mindepth 1 -type d 2>/dev/null | wc -l)
  if [ "$n" -gt 0 ]; then echo "leak: $n cgroup(s) under $d"; find "$d" -mindepth 1 -type d | head; leaks=1; fi
done
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  c=$(docker ps -aq --filter label=io.symbiont.sandbox | wc -l)
  if [ "$c" -gt 0 ]; then echo "leak: $c container(s) labelled io.symbiont.sandbox"; leaks=1; fi
fi
q=$(pgrep -fc 'qemu-system.*symbiont' || true)
if [ "${q:-0}" -gt 0 ]; then echo "leak: $q QEMU process(es)"; leaks=1; fi
if [ "$leaks" -ne 0 ]; then echo "leak check FAILED"; exit 1; fi
echo "    no sandboxes left behind"
