#!/usr/bin/env python3
"""Offsite sync throughput: a primary and a replica coordinator (release builds, loopback QUIC),
one agent backing up a PostgreSQL chat dump and an upload tree on day 1 and day 2 (the data of
compare.py), and `fleetvault-coordinator replicate` after each day.

Prints a Markdown table: per sync the snapshots, chunks and sealed bytes sent, wall time,
MB/s of sealed bytes, and the primary's and replica's peak RSS.

    python3 tests/bench/replication.py [--posts 400000] [--tree-mb 500] [--no-build]
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import chat_dumps, day_two_tree, make_tree  # noqa: E402
from pg_dedup import dir_size, free_port, REPO  # noqa: E402


def vmhwm_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--posts", type=int, default=400_000)
    ap.add_argument("--tree-mb", type=int, default=500)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=REPO, check=True)
    coord = f"{REPO}/target/release/fleetvault-coordinator"
    agent_bin = f"{REPO}/target/release/fleetvault-agent"
    root = tempfile.mkdtemp(prefix="fv-replication-")
    os.chmod(root, 0o755)
    procs = []
    try:
        dumps = chat_dumps(root, args.posts)
        live_dump, live_tree = f"{root}/live/dump.sql", f"{root}/live/tree"
        os.makedirs(f"{root}/live")
        make_tree(live_tree, args.tree_mb, 1)

        def start(name):
            port = free_port(socket.SOCK_DGRAM)
            data = f"{root}/{name}"
            subprocess.run([coord, "init", "--data-dir", data, "--listen", f"127.0.0.1:{port}"],
                           check=True, stdout=subprocess.DEVNULL)
            return data

        def serve(data):
            log = f"{data}.log"
            p = subprocess.Popen([coord, "serve", "--data-dir", data], stderr=open(log, "w"))
            while "listening on" not in open(log).read():
                time.sleep(0.05)
            procs.append(p)
            return p

        primary, replica = start("primary"), start("replica")
        out = f"{root}/peer"
        subprocess.run([coord, "issue-peer", "main", "--replica-name", "offsite", "--data-dir", replica,
                        "--out", out], check=True, stdout=subprocess.DEVNULL)
        shutil.copytree(out, f"{primary}/replicas/offsite")
        table = "".join(line for line in open(f"{out}/replica.toml") if not line.startswith("schedule"))
        with open(f"{primary}/coordinator.toml", "a") as f:
            f.write("\n" + table)
        p_serve, r_serve = serve(primary), serve(replica)
        subprocess.run([coord, "issue-agent", "bench", "--data-dir", primary, "--out", f"{root}/agent"],
                       check=True, stdout=subprocess.DEVNULL)
        conf = f"{root}/agent/agent.toml"
        with open(conf, "a") as f:
            f.write(f'\n[[sources]]\nname = "dump"\nkind = "command"\nbackup_command = "cat {live_dump}"\n'
                    f'\n[[sources]]\nname = "tree"\nkind = "files"\npaths = ["{live_tree}"]\n')
        rows = []
        for day in (1, 2):
            shutil.copyfile(dumps[day], live_dump)
            if day == 2:
                day_two_tree(live_tree, 2)
            for source in ("dump", "tree"):
                subprocess.run([agent_bin, "backup", "--config", conf, "--source", source],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            logical = os.path.getsize(live_dump) + dir_size(live_tree)
            t = time.time()
            res = subprocess.run([coord, "replicate", "--data-dir", primary, "--json"],
                                 check=True, capture_output=True, text=True)
            wall = time.time() - t
            r = json.loads(res.stdout)[0]
            rows.append((day, logical, r, wall, vmhwm_mib(p_serve.pid), vmhwm_mib(r_serve.pid)))
        print("| sync | backed-up data | snapshots | chunks sent | bytes sent | wall | MB/s sent "
              "| primary peak RSS | replica peak RSS |")
        print("|---|---|---|---|---|---|---|---|---|")
        for day, logical, r, wall, prss, rrss in rows:
            print(f"| day {day} | {logical / 1e6:.0f} MB | {r['snapshots']} | {r['chunks']} | "
                  f"{r['bytes'] / 1e6:.1f} MB | {wall:.1f} s | {r['bytes'] / 1e6 / wall:.0f} | "
                  f"{prss:.0f} MiB | {rrss:.0f} MiB |")
        print(f"\nday 2 sent {rows[1][2]['bytes'] / max(rows[0][2]['bytes'], 1) * 100:.1f}% of day 1's bytes")
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
