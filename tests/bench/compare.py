#!/usr/bin/env python3
"""fleetvault against restic and borg on the same data, side by side in one run.

Generates its data deterministically: a PostgreSQL chat database (throwaway server, see
pg_dedup.py) dumped with `pg_dump -Fp` on day 1 and again after a day of chat, and an upload
tree of mixed files (text, incompressible "media", a few large files) with day-2 additions,
deletions and edits. Then, for each tool in turn (alternating, `--rounds` times): day-1 backup
of the dump and of the tree, day-2 backup of both, restore of both. fleetvault runs as real
coordinator and agent processes over loopback QUIC; restic and borg write local repositories.

Prints one Markdown table: per tool and step the median wall time, MB/s, CPU seconds (client
plus, for fleetvault, the coordinator), peak RSS (the client's; for fleetvault also the
coordinator's during the step), stored bytes, and fleetvault's ratio to each.

    python3 tests/bench/compare.py [--posts 3300000] [--tree-mb 1024] [--rounds 3] [--level N]
        [--dump-input pipe|file] [--tools fleetvault,restic,borg] [--data DIR]

Every tool reads the dump the same way: through a pipe from `cat` by default, as from
`pg_dump |`. The defaults (a 1 GiB dump, a 1 GiB tree, three rounds) take about 10 minutes on
2 cores.

Installs restic and borgbackup from Debian's packages when missing (run as root).
"""

import argparse
import os
import random
import shutil
import stat
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pg_dedup import Pg, day_one, day_two, dir_size, free_port, REPO  # noqa: E402


ALL_TOOLS = ("fleetvault", "restic", "borg")


def run_measured(args, env=None, stdin=None, stdout=subprocess.DEVNULL, extra_pid=None):
    """Runs a command; returns (wall seconds, CPU seconds, peak RSS KiB, the extra process's peak
    RSS KiB during the command, the share of the machine's CPU time the host stole meanwhile).
    `extra_pid` (the coordinator) adds its CPU time to the command's."""
    # Every step starts with nothing left to write back: a tool that leaves its writes in the
    # page cache must not slow down the next step's syncs.
    os.sync()
    extra_before = proc_cpu(extra_pid) if extra_pid else 0.0
    if extra_pid:
        reset_hwm(extra_pid)
    drops = udp_receive_drops()
    steal = cpu_ticks()
    t = time.time()
    p = subprocess.Popen(args, env=env, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.time() - t
    steal = [b - a for a, b in zip(steal, cpu_ticks())]
    stolen = steal[7] / max(1, sum(steal))
    if stolen >= 0.05:
        print(f"  {os.path.basename(args[0])}: {stolen:.0%} of the CPU stolen by the host",
              file=sys.stderr, flush=True)
    drops = udp_receive_drops() - drops
    if drops:
        print(f"  {os.path.basename(args[0])}: {drops} UDP packets dropped (receive buffers full)",
              file=sys.stderr, flush=True)
    err = p.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{args[0]} failed: {err.strip()}")
    cpu = ru.ru_utime + ru.ru_stime
    extra_rss = 0
    if extra_pid:
        cpu += proc_cpu(extra_pid) - extra_before
        extra_rss = vmhwm_kib(extra_pid)
    return wall, cpu, ru.ru_maxrss, extra_rss, stolen


def cpu_ticks():
    """The machine's CPU time by kind (/proc/stat: user, nice, system, idle, iowait, irq,
    softirq, steal), in ticks."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def udp_receive_drops():
    """The system's count of UDP packets dropped for a full receive buffer."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def vmhwm_kib(pid):
    """A running process's peak RSS (KiB) since it started or since `reset_hwm`."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def reset_hwm(pid):
    """Resets a process's peak RSS to its current RSS (Linux `clear_refs` 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_tree(root, mb, seed):
    rng = random.Random(seed)
    os.makedirs(root)
    total = 0
    i = 0
    words = [f"word{n}" for n in range(2000)]
    while total < mb * 1_000_000:
        d = os.path.join(root, f"team-{i % 20}", f"channel-{i % 97}")
        os.makedirs(d, exist_ok=True)
        kind = i % 10
        if kind < 6:
            data = (" ".join(rng.choices(words, k=rng.randint(50, 4000))) + "\n").encode()
            name = f"post-{i}.txt"
        elif kind < 9:
            data = rng.randbytes(rng.randint(20_000, 400_000))
            name = f"image-{i}.jpg"
        else:
            data = rng.randbytes(rng.randint(2_000_000, 8_000_000))
            name = f"video-{i}.mp4"
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
        total += len(data)
        i += 1
    return i


def day_two_tree(root, seed):
    rng = random.Random(seed)
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs)
    for f in rng.sample(files, len(files) // 50):  # 2% deleted
        os.remove(f)
        files.remove(f)
    for f in rng.sample(files, len(files) // 50):  # 2% edited
        with open(f, "ab") as fh:
            fh.write(b"edited on day two\n")
    for n in range(len(files) // 20):  # 5% added
        with open(os.path.join(root, f"new-{n}.jpg"), "wb") as fh:
            fh.write(rng.randbytes(rng.randint(20_000, 400_000)))


def release_space(root):
    """Frees a finished round's disk space but keeps its inodes until the run ends: thousands of
    freed inodes (a restored tree, a store's chunk files) would tax every file the next tool
    creates for a minute on ext4 without a journal (this machine's disk), a cost only the tool
    that creates thousands of files (fleetvault's store) would pay."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:  # never an input's hard link
                os.truncate(path, 0)


def sync_tree(src, dst):
    """Makes `dst` the tree `src` with hard links, replacing only files whose size or mtime
    differ and removing what `src` lacks (rsync's quick check): unchanged files keep their
    inode and times, as on a real host between two days."""
    for dirpath, dirs, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        target = os.path.normpath(os.path.join(dst, rel))
        os.makedirs(target, exist_ok=True)
        for f in files:
            a, b = os.path.join(dirpath, f), os.path.join(target, f)
            sa = os.stat(a)
            try:
                sb = os.stat(b)
                if sb.st_size == sa.st_size and sb.st_mtime_ns == sa.st_mtime_ns:
                    continue
                os.remove(b)
            except FileNotFoundError:
                pass
            os.link(a, b)
    for dirpath, dirs, files in os.walk(dst, topdown=False):
        rel = os.path.relpath(dirpath, dst)
        for f in files:
            if not os.path.exists(os.path.join(src, rel, f)):
                os.remove(os.path.join(dirpath, f))
        if not os.path.exists(os.path.join(src, rel)):
            os.rmdir(dirpath)


def chat_dumps(root, posts):
    """Dumps (`pg_dump -Fp`) of a generated chat database on day 1 and after a day of chat, made
    with a throwaway PostgreSQL server under `root`; returns {1: path, 2: path}."""
    pg = Pg(root)
    try:
        env = dict(os.environ, PGHOST=f"{root}/pg", PGPORT=str(pg.port), PGUSER="postgres")
        pg.psql("postgres", "CREATE DATABASE chat")
        pg.psql("chat", day_one(posts))
        pg.psql("chat", "VACUUM ANALYZE")
        dumps = {}
        for day in (1, 2):
            if day == 2:
                pg.psql("chat", day_two(posts))
                pg.psql("chat", "VACUUM")
            dumps[day] = f"{root}/dump-day{day}.sql"
            with open(dumps[day], "wb") as f:
                subprocess.run(["pg_dump", "-Fp", "chat"], env=env, stdout=f, check=True)
        return dumps
    finally:
        pg.stop()


def inputs(root, posts, tree_mb):
    """The day-1 and day-2 dumps and trees under `root`, generated unless an earlier run with the
    same sizes left them there (`ready` marks a complete set)."""
    dumps = {d: f"{root}/dump-day{d}.sql" for d in (1, 2)}
    trees = {d: f"{root}/tree{d}" for d in (1, 2)}
    ready = f"{root}/ready"
    wanted = f"posts={posts} tree_mb={tree_mb}\n"
    if os.path.exists(ready) and open(ready).read() == wanted:
        return dumps, trees
    os.makedirs(root, exist_ok=True)
    os.chmod(root, 0o755)
    for path in [ready, *dumps.values()]:
        if os.path.exists(path):
            os.remove(path)
    for path in [*trees.values(), f"{root}/pg"]:
        shutil.rmtree(path, ignore_errors=True)
    chat_dumps(root, posts)
    shutil.rmtree(f"{root}/pg")  # the server's files: only the dumps are inputs
    make_tree(trees[1], tree_mb, 1)
    shutil.copytree(trees[1], trees[2], symlinks=True)
    day_two_tree(trees[2], 2)
    with open(ready, "w") as f:
        f.write(wanted)
    return dumps, trees


def main():
    ap = argparse.ArgumentParser()
    # The defaults make a dump of about 1 GiB and a tree of 1 GiB in about 1,800 files.
    ap.add_argument("--posts", type=int, default=3_300_000)
    ap.add_argument("--tree-mb", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--tools", default="fleetvault,restic,borg",
                    help="comma-separated subset of fleetvault,restic,borg (ratios need all three)")
    ap.add_argument("--data", default=None,
                    help="keep the generated inputs in this directory and reuse them on the next run")
    ap.add_argument("--dump-input", choices=["pipe", "file"], default="pipe",
                    help="how every tool reads the dump: from `cat dump |` as it would from `pg_dump |` "
                         "(fleetvault: a command source; restic: --stdin; borg: -), or as a file")
    ap.add_argument("--level", type=int, default=None,
                    help="fleetvault's zstd level (compression_level of both sources; default: the agent's)")
    args = ap.parse_args()
    tools = args.tools.split(",")
    if not tools or any(t not in ALL_TOOLS for t in tools):
        raise SystemExit(f"--tools: expected a subset of {','.join(ALL_TOOLS)}, got {args.tools!r}")
    missing = [p for p, t in [("restic", "restic"), ("borgbackup", "borg")] if t in tools and not shutil.which(t)]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True)
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=REPO, check=True)
    binv = f"{REPO}/target/release"
    root = tempfile.mkdtemp(prefix="fv-compare-")
    os.chmod(root, 0o755)
    keep = args.data and os.path.abspath(args.data)
    pipe = args.dump_input == "pipe"
    serve = None
    results = {}  # (tool, step) -> list of (wall, cpu, rss)
    sizes = {}  # (tool, after) -> stored bytes
    try:
        dumps, trees = inputs(keep or root, args.posts, args.tree_mb)
        nfiles = sum(len(fs) for _, _, fs in os.walk(trees[1]))
        dump_mb = os.path.getsize(dumps[1]) / 1e6
        tree_mb = dir_size(trees[1]) / 1e6
        # Both days' inputs live at the same paths when backed up, as on a real host.
        live_dump, live_tree = f"{root}/live/dump.sql", f"{root}/live/tree"
        cat_dump = f"cat {live_dump}"
        os.makedirs(f"{root}/live")

        def stage(day):
            """Makes the live inputs day `day`'s. The tree changes in place, as on a real host:
            unchanged files keep their inodes and times, so every tool can skip them on day 2.
            Going back to day 1 is done in place too: removing the tree's ~2000 directories
            would free as many inodes (see `release_space`)."""
            if os.path.exists(live_dump):
                os.remove(live_dump)
            os.link(dumps[day], live_dump)
            sync_tree(trees[day], live_tree)  # run_measured syncs before each step

        for rnd in range(args.rounds):
            # Alternate who goes first: page cache and the neighbours' load favour nobody.
            for tool in tools[rnd % len(tools):] + tools[:rnd % len(tools)]:
                print(f"round {rnd + 1}/{args.rounds}: {tool}", file=sys.stderr, flush=True)
                work = f"{root}/{tool}-{rnd}"
                os.makedirs(work)
                if tool == "fleetvault":
                    port = free_port(socket.SOCK_DGRAM)
                    data = f"{work}/coordinator"
                    subprocess.run([f"{binv}/fleetvault-coordinator", "init", "--data-dir", data,
                                    "--listen", f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
                    serve = subprocess.Popen([f"{binv}/fleetvault-coordinator", "serve", "--data-dir", data],
                                             stderr=open(f"{work}/serve.log", "w"))
                    while "listening on" not in open(f"{work}/serve.log").read():
                        time.sleep(0.05)
                    subprocess.run([f"{binv}/fleetvault-coordinator", "issue-agent", "bench", "--data-dir", data,
                                    "--out", f"{work}/agent"], check=True, stdout=subprocess.DEVNULL)
                    conf = f"{work}/agent/agent.toml"
                    with open(conf, "a") as f:
                        level = f"compression_level = {args.level}\n" if args.level else ""
                        dump_source = (f'kind = "command"\nbackup_command = "{cat_dump}"\n' if pipe
                                       else f'kind = "files"\npaths = ["{live_dump}"]\n')
                        f.write(f'\n[[sources]]\nname = "dump"\n{dump_source}{level}'
                                f'\n[[sources]]\nname = "tree"\nkind = "files"\npaths = ["{live_tree}"]\n{level}')
                    repo = f"{data}/store"
                    ids = {}

                    def backup(source):
                        out = f"{work}/last.json"
                        with open(out, "w") as fh:
                            m = run_measured([f"{binv}/fleetvault-agent", "backup", "--config", conf, "--source",
                                              source, "--json"], stdout=fh, extra_pid=serve.pid)
                        import json
                        ids[source] = json.load(open(out))["snapshot_id"]
                        return m

                    def restore(source):
                        target = f"{work}/restore-{source}"
                        return run_measured([f"{binv}/fleetvault-agent", "restore", "--config", conf,
                                             ids[source], "--target", target], extra_pid=serve.pid)
                elif tool == "restic":
                    repo = f"{work}/repo"
                    renv = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_REPOSITORY=repo)
                    subprocess.run(["restic", "init"], env=renv, check=True, stdout=subprocess.DEVNULL)

                    def backup(source, renv=renv):
                        if source == "dump" and pipe:
                            return run_measured(["sh", "-c", f"{cat_dump} | restic backup -q --tag dump "
                                                 "--stdin --stdin-filename dump.sql"], env=renv)
                        path = live_dump if source == "dump" else live_tree
                        return run_measured(["restic", "backup", "-q", "--tag", source, path], env=renv)

                    def restore(source, renv=renv, work=work):
                        return run_measured(["restic", "restore", "latest", "--tag", source, "--target",
                                             f"{work}/restore-{source}"], env=renv)
                else:
                    repo = f"{work}/repo"
                    benv = dict(os.environ, BORG_PASSPHRASE="", BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes")
                    subprocess.run(["borg", "init", "-e", "none", repo], env=benv, check=True)
                    counter = {"n": 0}

                    def backup(source, benv=benv, repo=repo, counter=counter):
                        counter["n"] += 1
                        archive = f"{repo}::{source}-{counter['n']}"
                        if source == "dump" and pipe:
                            return run_measured(["sh", "-c", f"{cat_dump} | borg create --compression lz4 "
                                                 f"{archive} -"], env=benv)
                        path = live_dump if source == "dump" else live_tree
                        return run_measured(["borg", "create", "--compression", "lz4", archive, path], env=benv)

                    def restore(source, benv=benv, repo=repo, counter=counter, work=work):
                        target = f"{work}/restore-{source}"
                        os.makedirs(target)
                        names = subprocess.run(["borg", "list", "--short", repo], env=benv, check=True,
                                               capture_output=True, text=True).stdout.split()
                        last = [n for n in names if n.startswith(source + "-")][-1]
                        return run_measured(["sh", "-c", f"cd {target} && borg extract {repo}::{last}"], env=benv)
                for day in (1, 2):
                    stage(day)
                    for source in ("dump", "tree"):
                        results.setdefault((tool, f"day-{day} {source}"), []).append(backup(source))
                    sizes[(tool, day)] = dir_size(repo)
                for source in ("dump", "tree"):
                    results.setdefault((tool, f"restore {source}"), []).append(restore(source))
                if tool == "fleetvault":
                    serve.terminate()
                    serve.wait()
                    serve = None
                release_space(work)

        mb_of = {"dump": dump_mb, "tree": tree_mb}
        peers = all(t in tools for t in ALL_TOOLS)
        print(f"\nInputs: PostgreSQL chat dump {dump_mb:.0f} MB ({args.posts} posts, read from a {args.dump_input}), upload tree "
              f"{tree_mb:.0f} MB ({nfiles} files); {args.rounds} round(s), medians; 2 cores.\n")
        print("| step | tool | wall s | MB/s | CPU s | peak RSS MB | coordinator peak RSS MB "
              "| fleetvault vs restic | vs borg |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        steps = [f"day-{d} {s}" for d in (1, 2) for s in ("dump", "tree")] + ["restore dump", "restore tree"]
        for step in steps:
            med = {}
            for tool in tools:
                runs = results[(tool, step)]
                wall = statistics.median(r[0] for r in runs)
                cpu = statistics.median(r[1] for r in runs)
                rss = max(r[2] for r in runs) / 1024
                crss = f"{max(r[3] for r in runs) / 1024:.0f}" if tool == "fleetvault" else ""
                med[tool] = wall
                mbps = mb_of[step.split()[-1]] / wall
                print(f"| {step} | {tool} | {wall:.2f} | {mbps:.0f} | {cpu:.1f} | {rss:.0f} | {crss} | | |")
            if peers:
                print(f"| {step} | **ratio** | | | | | | {med['restic'] / med['fleetvault']:.2f}x | "
                      f"{med['borg'] / med['fleetvault']:.2f}x |")
        print("\n| stored | " + " | ".join(tools) + " |")
        print("| --- |" + " --- |" * len(tools))
        for day in (1, 2):
            print(f"| after day {day} | " + " | ".join(f"{sizes[(t, day)] / 1e6:.1f} MB" for t in tools) + " |")
        print("| added by day 2 | " + " | ".join(f"{(sizes[(t, 2)] - sizes[(t, 1)]) / 1e6:.1f} MB" for t in tools)
              + " |")
        worst = max((r[4], tool, step) for (tool, step), runs in results.items() for r in runs)
        print(f"\nMost CPU stolen by the host during one step: {worst[0]:.0%} ({worst[1]}, {worst[2]}); "
              "steps with steal are slower for reasons outside the tools.")
        if peers:
            print(f"\nfleetvault stored / restic stored: day 1 {sizes[('fleetvault', 1)] / sizes[('restic', 1)]:.2f}x, "
                  f"day 2 {sizes[('fleetvault', 2)] / sizes[('restic', 2)]:.2f}x")
    finally:
        if serve:
            serve.terminate()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
