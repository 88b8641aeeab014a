#!/usr/bin/env python3
"""Scaling: the same pipeline at growing sizes, and many agents at once.

1. One agent backs up a generated stream of 100 MiB, 1 GiB and 4 GiB (text and random blocks,
   deterministic, produced on the fly by a small generator so nothing touches the disk): wall
   time should grow linearly and peak RSS stay flat.
2. N agents (default 10) back up 256 MiB each at the same time against one coordinator:
   aggregate throughput and the coordinator's peak memory.

    python3 tests/bench/scaling.py [--sizes 100,1024,4096] [--agents 10] [--each 256]
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
from compare import proc_cpu, reset_hwm, run_measured, vmhwm_kib  # noqa: E402
from pg_dedup import REPO, free_port  # noqa: E402

# Writes MIB mebibytes (argv[1]) of blocks: a text block then a random one, seeded by argv[2].
GENERATOR = r"""
import random, sys
mib, seed = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
words = [("w%d" % i).encode() for i in range(5000)]
out = sys.stdout.buffer
text = b" ".join(rng.choices(words, k=120000))[: 1 << 19]
for i in range(mib):
    out.write(text[i % 7:] + text[: i % 7])
    out.write(rng.randbytes(1 << 19))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1024,4096")
    ap.add_argument("--agents", type=int, default=10)
    ap.add_argument("--each", type=int, default=256)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=REPO, check=True)
    binv = f"{REPO}/target/release"
    root = tempfile.mkdtemp(prefix="fv-scaling-")
    gen = f"{root}/gen.py"
    with open(gen, "w") as f:
        f.write(GENERATOR)
    port = free_port(socket.SOCK_DGRAM)
    data = f"{root}/coordinator"
    subprocess.run([f"{binv}/fleetvault-coordinator", "init", "--data-dir", data, "--listen",
                    f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
    serve = subprocess.Popen([f"{binv}/fleetvault-coordinator", "serve", "--data-dir", data],
                             stderr=open(f"{root}/serve.log", "w"))
    try:
        while "listening on" not in open(f"{root}/serve.log").read():
            time.sleep(0.05)
        sizes = [int(s) for s in args.sizes.split(",")]
        confs = []
        for i in range(max(1, args.agents)):
            out = f"{root}/agent-{i}"
            subprocess.run([f"{binv}/fleetvault-coordinator", "issue-agent", f"host-{i}", "--data-dir",
                            data, "--out", out], check=True, stdout=subprocess.DEVNULL)
            with open(f"{out}/agent.toml", "a") as f:
                for mib in sizes + [args.each]:
                    f.write(f'\n[[sources]]\nname = "s{mib}"\nkind = "command"\n'
                            f'backup_command = "python3 {gen} {mib} {i * 1000 + mib}"\n')
            confs.append(f"{out}/agent.toml")

        print("\n| stream | wall s | MB/s | CPU s (agent + coordinator) | agent peak RSS MB | "
              "coordinator peak RSS MB | time per GiB |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for mib in sizes:
            wall, cpu, rss, crss, _stolen = run_measured([f"{binv}/fleetvault-agent", "backup", "--config", confs[0],
                                                         "--source", f"s{mib}", "--json"], extra_pid=serve.pid)
            mb = mib * 1.048576
            print(f"| {mib} MiB | {wall:.1f} | {mb / wall:.0f} | {cpu:.1f} | {rss / 1024:.0f} | {crss / 1024:.0f} | "
                  f"{wall / (mib / 1024):.1f} s |")

        if args.agents > 1:
            before = proc_cpu(serve.pid)
            reset_hwm(serve.pid)
            t = time.time()
            procs = [subprocess.Popen([f"{binv}/fleetvault-agent", "backup", "--config", c, "--source",
                                       f"s{args.each}", "--json"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE) for c in confs]
            ok = 0
            for p in procs:
                out, err = p.communicate()
                if p.returncode == 0 and json.loads(out)["status"] == "completed":
                    ok += 1
                else:
                    print(f"agent failed: {err.decode().strip()}")
            wall = time.time() - t
            total_mb = args.agents * args.each * 1.048576
            print(f"\n{args.agents} agents x {args.each} MiB at once: {ok} completed in {wall:.1f} s, "
                  f"aggregate {total_mb / wall:.0f} MB/s; coordinator CPU {proc_cpu(serve.pid) - before:.1f} s, "
                  f"coordinator peak RSS {vmhwm_kib(serve.pid) / 1024:.0f} MB")
    finally:
        serve.terminate()
        serve.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
