# Shared by the local benchmarks (bench-fs, bench-mount, bench-gateway): sourced after
# they set B (the binaries), W (the work directory), NODES and PIDS=().

now() { date +%s.%N; }
calc() { echo "scale=3; $1" | bc -l; }
median() { printf "%s\n" "$@" | sort -g | sed -n "$(( ($# + 1) / 2 ))p"; }
best() { printf "%s\n" "$@" | sort -g | head -1; }
timed() { local t0=$(now); eval "$1" > /dev/null; local t1=$(now); calc "$t1 - $t0"; }

# The disk quiet, then the page cache dropped. With online discard (ext4 -o discard) a
# deleted file keeps the disk busy for a while after `sync` returns, and a cold read
# started then measures that: bindfs's cold read of 256 MiB went from 0.09 s to 0.5 s
# right after the previous run's file cache was removed.
DISK_STAT=/sys/dev/block/$(findmnt -no MAJ:MIN -T "$W" 2>/dev/null | head -1 | tr -d " ")/stat
[ -r "$DISK_STAT" ] || echo "note: no disk statistics for $W; cold reads start without waiting for a quiet disk" >&2
busy_ms() { awk '{print $10}' "$DISK_STAT" 2>/dev/null || echo 0; }
drop() {
  sync
  local quiet=0 last=$(busy_ms) deadline=$((SECONDS + 30))
  while [ $quiet -lt 3 ] && [ $SECONDS -lt $deadline ]; do
    sleep 0.1
    local now=$(busy_ms)
    if [ "$now" = "$last" ]; then quiet=$((quiet + 1)); else quiet=0; fi
    last=$now
  done
  echo 3 > /proc/sys/vm/drop_caches
}

# start_ring [cfsd flags...]: NODES local nodes (logs in $W/nI.log); sets A, the first
# node's address, once every node is in the ring.
start_ring() {
  $B/cfsd --listen 127.0.0.1:0 --data $W/n0 "$@" 2>$W/n0.log & PIDS+=($!)
  while [ ! -s $W/n0/addr ]; do sleep 0.05; done
  A=$(cat $W/n0/addr)
  local i
  for i in $(seq 1 $((NODES-1))); do
    $B/cfsd --listen 127.0.0.1:0 --data $W/n$i --join $A "$@" 2>$W/n$i.log & PIDS+=($!)
  done
  for i in $(seq 1 $((NODES-1))); do while [ ! -s $W/n$i/addr ]; do sleep 0.05; done; done
  until [ "$($B/cfs ring --node $A | wc -l)" = $NODES ]; do sleep 0.2; done
}

# floor BASELINE_READ: the time, cold, of the baseline's read of $W/src/big run at once
# with the least work any cfs read of it must add (tests/src/bin/floor.rs: the bytes cross a
# loopback socket from another process, sent with sendfile, and are SHA-1'd on every
# core; no lookups, protocol or cache). The baseline over this time is the highest ratio
# cfs could reach on this machine.
floor() {
  drop
  timed "($1 > /dev/null & $B/floor $W/src/big > /dev/null & wait)"
}
