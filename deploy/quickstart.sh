#!/usr/bin/env bash
# fleetvault quickstart: builds the release binaries and walks through the whole loop on this
# machine, on 127.0.0.1 only:
#
#   coordinator init + serve -> issue an agent -> back up a demo tree -> change two files ->
#   back up again (only the changes travel) -> list snapshots -> restore -> diff -> stop.
#
# Everything lives in one directory: $FLEETVAULT_QUICKSTART_DIR (must be empty or absent), or a
# fresh temporary one that is removed at the end (set FLEETVAULT_QUICKSTART_KEEP=1 to keep it).
# Exits non-zero on any failure.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }

step "building release binaries (cargo build --release --bins)"
(cd "$repo" && cargo build --release --bins)
bin=${CARGO_TARGET_DIR:-$repo/target}/release
coordinator=$bin/fleetvault-coordinator
agent=$bin/fleetvault-agent
[[ -x $coordinator && -x $agent ]] || fail "binaries not found in $bin"

created_dir=
if [[ -n ${FLEETVAULT_QUICKSTART_DIR:-} ]]; then
    mkdir -p "$FLEETVAULT_QUICKSTART_DIR"
    dir=$(cd "$FLEETVAULT_QUICKSTART_DIR" && pwd)
    [[ -z $(ls -A "$dir") ]] || fail "$dir is not empty"
else
    dir=$(mktemp -d "${TMPDIR:-/tmp}/fleetvault-quickstart.XXXXXX")
    created_dir=$dir
fi
data=$dir/coordinator
agent_dir=$dir/agent
demo=$dir/demo/app
serve_log=$dir/serve.log
serve_pid=

cleanup() {
    local status=$?
    trap - EXIT
    if [[ -n $serve_pid ]] && kill -0 "$serve_pid" 2>/dev/null; then
        kill -TERM "$serve_pid" 2>/dev/null || true
        wait "$serve_pid" 2>/dev/null || true
    fi
    if ((status != 0)); then
        echo "quickstart FAILED (exit $status)" >&2
        [[ -f $serve_log ]] && { echo "--- last lines of $serve_log" >&2; tail -n 30 "$serve_log" >&2; }
    fi
    if [[ -n $created_dir && -z ${FLEETVAULT_QUICKSTART_KEEP:-} ]]; then
        rm -rf "$created_dir"
    else
        echo "files kept in $dir"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free UDP port on 127.0.0.1 (the coordinator speaks QUIC).
if command -v python3 >/dev/null 2>&1; then
    port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
else
    port=$((20000 + RANDOM % 20000))
fi

step "fleetvault-coordinator init --data-dir $data --listen 127.0.0.1:$port"
"$coordinator" init --data-dir "$data" --listen "127.0.0.1:$port"
ls "$data" "$data/tls"

step "fleetvault-coordinator serve (in the background, log in $serve_log)"
"$coordinator" serve --data-dir "$data" 2>"$serve_log" &
serve_pid=$!
for _ in $(seq 1 300); do
    grep -q "fleetvault-coordinator listening on" "$serve_log" && break
    kill -0 "$serve_pid" 2>/dev/null || fail "serve exited before it was ready"
    sleep 0.2
done
grep "fleetvault-coordinator listening on" "$serve_log" || fail "serve not ready after 60 s"

step "fleetvault-coordinator issue-agent demo-host --out $agent_dir"
"$coordinator" issue-agent demo-host --data-dir "$data" --out "$agent_dir"
cat >>"$agent_dir/agent.toml" <<EOF

[[sources]]
name = "demo"
kind = "files"
paths = ["$demo"]
exclude = ["*.tmp"]
EOF
cat "$agent_dir/agent.toml"

step "creating a demo application directory in $demo"
mkdir -p "$demo/config" "$demo/empty"
printf '{\n  "ServiceSettings": {"SiteURL": "https://chat.example.com"}\n}\n' >"$demo/config/config.json"
for team in 1 2 3 4 5 6; do
    for channel in 1 2 3 4 5; do
        d=$demo/data/teams/team-$team/channels/channel-$channel
        mkdir -p "$d"
        for n in $(seq 1 10); do
            # Some compressible text, some incompressible attachments.
            if ((n % 3 == 0)); then
                head -c $((4096 + n * 1024)) /dev/urandom >"$d/attachment-$n.bin"
            else
                (yes "message $n in channel $channel of team $team" || true) |
                    head -c $((2048 + n * 512)) >"$d/post-$n.txt"
            fi
        done
    done
done
head -c $((2 * 1024 * 1024)) /dev/urandom >"$demo/data/big-upload.bin"
ln -s config/config.json "$demo/current-config"
echo "scratch" >"$demo/data/cache.tmp"
echo "$(find "$demo" -type f | wc -l) files, $(du -sh "$demo" | cut -f1)"

json_field() { sed -n "s/^ *\"$1\": *\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" "$2" | head -n 1; }

step "fleetvault-agent backup --source demo (first backup: everything is new)"
"$agent" backup --config "$agent_dir/agent.toml" --source demo --json | tee "$dir/backup-1.json"
id1=$(json_field snapshot_id "$dir/backup-1.json")
up1=$(json_field bytes_uploaded "$dir/backup-1.json")
[[ -n $id1 && -n $up1 ]] || fail "could not read the first backup's report"

step "changing two files and adding one"
echo "edited after the first backup" >>"$demo/data/teams/team-1/channels/channel-1/post-1.txt"
printf '{\n  "ServiceSettings": {"SiteURL": "https://chat2.example.com"}\n}\n' >"$demo/config/config.json"
echo "a new post" >"$demo/data/teams/team-2/channels/channel-2/post-new.txt"

step "fleetvault-agent backup --source demo (second backup: only the changes travel)"
"$agent" backup --config "$agent_dir/agent.toml" --source demo --json | tee "$dir/backup-2.json"
id2=$(json_field snapshot_id "$dir/backup-2.json")
up2=$(json_field bytes_uploaded "$dir/backup-2.json")
unchanged=$(json_field files_unchanged "$dir/backup-2.json")
[[ -n $id2 && -n $up2 ]] || fail "could not read the second backup's report"
echo "first backup uploaded $up1 bytes; second uploaded $up2 bytes ($unchanged files unchanged, not re-read)"
((up2 * 10 < up1)) || fail "the second backup uploaded too much: $up2 of $up1 bytes"

step "fleetvault-agent snapshots"
"$agent" snapshots --config "$agent_dir/agent.toml"
step "fleetvault-coordinator snapshots (the operator's view of the fleet)"
"$coordinator" snapshots --data-dir "$data"

step "fleetvault-agent restore $id2 --target $dir/restore"
"$agent" restore --config "$agent_dir/agent.toml" "$id2" --target "$dir/restore"
restored=$dir/restore$demo
rm -f "$demo/data/cache.tmp" # excluded from the backup
diff -r --no-dereference "$demo" "$restored"
echo "OK: $restored is identical to $demo"

step "stopping the coordinator (SIGTERM)"
kill -TERM "$serve_pid"
status=0
wait "$serve_pid" || status=$?
serve_pid=
((status == 0)) || fail "serve exited with status $status on SIGTERM"
echo "coordinator stopped cleanly"

step "quickstart completed"
