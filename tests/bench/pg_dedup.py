#!/usr/bin/env python3
"""PostgreSQL dedup benchmark: what one realistic chat day costs to back up.

Starts a throwaway PostgreSQL server and a fleetvault coordinator and agent (release binaries,
real processes on loopback), builds a chat database (users, posts, reactions, a hot status
table), and backs it up on day 1 and, after one day of chat (+1% posts, edits and deletes
among the newest posts, every user's status touched, VACUUM), on day 2, with fleetvault's
three PostgreSQL formats and with restic reading a plain `pg_dump` from stdin. It also
reloads the database into a new one (same rows, another physical order) and backs that up.

Prints one Markdown table. Usage (as root; installs restic and zstd from Debian if missing):

    python3 tests/bench/pg_dedup.py [--posts 400000] [--keep]
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

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sh(*args, **kw):
    kw.setdefault("check", True)
    return subprocess.run(args, **kw)


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def day_one(posts):
    users = max(500, posts // 200)
    return f"""
CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL UNIQUE, created timestamptz NOT NULL);
CREATE TABLE posts (id bigserial PRIMARY KEY, user_id int NOT NULL REFERENCES users(id),
  channel text NOT NULL, body text NOT NULL, created timestamptz NOT NULL, edited timestamptz);
CREATE INDEX posts_channel_created ON posts (channel, created);
CREATE TABLE reactions (post_id bigint NOT NULL, user_id int NOT NULL, emoji text NOT NULL);
CREATE UNIQUE INDEX reactions_unique ON reactions (post_id, user_id, emoji);
CREATE TABLE status (user_id int PRIMARY KEY, state text, seen timestamptz);
INSERT INTO users (name, created) SELECT 'user-' || g, timestamptz '2026-01-01' + g * interval '1 minute'
  FROM generate_series(1, {users}) g;
INSERT INTO posts (user_id, channel, body, created)
  SELECT 1 + (g::bigint * 7919) % {users}, 'channel-' || (g % 97),
         md5(g::text) || ' ' || substr(repeat(md5((g * 31)::text) || ' lorem ipsum chat text ', 8), 1, 40 + (g * 13) % 400),
         timestamptz '2026-02-01' + g * interval '3 seconds'
  FROM generate_series(1, {posts}) g;
INSERT INTO reactions SELECT p, 1 + (p * 31) % {users}, (ARRAY['+1', 'tada', 'heart'])[1 + p % 3]
  FROM generate_series(1, {posts}, 4) p;
INSERT INTO status SELECT id, 'online', timestamptz '2026-03-01' FROM users;
"""


def day_two(posts):
    new = posts // 100
    users = max(500, posts // 200)
    return f"""
INSERT INTO posts (user_id, channel, body, created)
  SELECT 1 + (g::bigint * 104729) % {users}, 'channel-' || (g % 97), 'day two ' || md5(g::text) || repeat(' reply', g % 20),
         timestamptz '2026-03-05' + g * interval '5 seconds' FROM generate_series(1, {new}) g;
UPDATE posts SET body = body || ' (edited)', edited = timestamptz '2026-03-06'
  WHERE id > {posts} - {new} AND id % 10 = 0;
DELETE FROM reactions WHERE post_id > {posts} - {new} AND post_id % 25 = 1;
DELETE FROM posts p WHERE id > {posts} - {new} AND id % 50 = 7
  AND NOT EXISTS (SELECT 1 FROM reactions r WHERE r.post_id = p.id);
UPDATE status SET state = CASE WHEN user_id % 3 = 0 THEN 'away' ELSE 'online' END, seen = timestamptz '2026-03-06';
"""


class Pg:
    def __init__(self, root):
        self.root = root
        self.bin = sorted(
            (int(v), f"/usr/lib/postgresql/{v}/bin") for v in os.listdir("/usr/lib/postgresql")
        )[-1][1]
        self.port = free_port()
        os.makedirs(f"{root}/pg")
        shutil.chown(f"{root}/pg", "postgres", "postgres")
        sh("runuser", "-u", "postgres", "--", f"{self.bin}/initdb", "-D", f"{root}/pg/data",
           "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8",
           stdout=subprocess.DEVNULL)
        self.proc = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", f"{self.bin}/postgres", "-D", f"{root}/pg/data",
             "-p", str(self.port), "-k", f"{root}/pg", "-c", "listen_addresses=",
             "-c", "fsync=off", "-c", "max_wal_size=4GB"],
            stderr=open(f"{root}/pg/log", "w"))
        for _ in range(300):
            if self.psql("postgres", "SELECT 1", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise SystemExit("postgres did not start")

    def psql(self, db, sql, check=True, **kw):
        r = sh("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", f"{self.root}/pg",
               "-p", str(self.port), "-U", "postgres", "-d", db, "-c", sql,
               check=False, capture_output=True, text=True, **kw)
        if check and r.returncode != 0:
            raise SystemExit(f"psql failed: {r.stderr.strip()}")
        return r

    def stop(self):
        sh("runuser", "-u", "postgres", "--", f"{self.bin}/pg_ctl", "-D", f"{self.root}/pg/data",
           "stop", "-m", "fast", check=False, stdout=subprocess.DEVNULL)


def table_lines(pg, db):
    """Every row of every table as text lines, sorted by key: what "the rows" are."""
    rows = {}
    for t, key in [("users", "id"), ("posts", "id"), ("reactions", "post_id, user_id, emoji"),
                   ("status", "user_id")]:
        out = pg.psql(db, f"COPY (SELECT * FROM {t} ORDER BY {key}) TO STDOUT").stdout
        rows[t] = set(out.splitlines())
    return rows


def zstd_size(data):
    return len(sh("zstd", "-3", "-c", input=data, capture_output=True).stdout)


def dir_size(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--posts", type=int, default=400_000)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    missing = [p for p, tool in [("restic", "restic"), ("zstd", "zstd")] if not shutil.which(tool)]
    if missing:
        sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing)
    if not args.no_build:
        sh("cargo", "build", "--release", "--bins", cwd=REPO)
    binv = f"{REPO}/target/release"
    root = tempfile.mkdtemp(prefix="fv-bench-pg-")
    os.chmod(root, 0o755)
    pg = Pg(root)
    serve = None
    try:
        pg.psql("postgres", "CREATE DATABASE chat")
        pg.psql("chat", day_one(args.posts))
        pg.psql("chat", "VACUUM ANALYZE")
        size = pg.psql("chat", "SELECT pg_database_size('chat')").stdout.strip()

        cport = free_port(socket.SOCK_DGRAM)
        data = f"{root}/coordinator"
        sh(f"{binv}/fleetvault-coordinator", "init", "--data-dir", data, "--listen",
           f"127.0.0.1:{cport}", stdout=subprocess.DEVNULL)
        serve = subprocess.Popen([f"{binv}/fleetvault-coordinator", "serve", "--data-dir", data],
                                 stderr=open(f"{root}/serve.log", "w"))
        for _ in range(100):
            if "listening on" in open(f"{root}/serve.log").read():
                break
            time.sleep(0.1)
        sh(f"{binv}/fleetvault-coordinator", "issue-agent", "bench", "--data-dir", data,
           "--out", f"{root}/agent", stdout=subprocess.DEVNULL)
        conf = f"{root}/agent/agent.toml"
        with open(conf, "a") as f:
            for name, db, fmt in [("tables", "chat", "tables"), ("plain", "chat", "plain"),
                                  ("custom", "chat", "custom"), ("reload", "chat_reload", "tables")]:
                f.write(f'\n[[sources]]\nname = "{name}"\nkind = "postgres"\ndatabase = "{db}"\n'
                        f'host = "{root}/pg"\nport = {pg.port}\nuser = "postgres"\nformat = "{fmt}"\n')

        def backup(source):
            out = sh(f"{binv}/fleetvault-agent", "backup", "--config", conf, "--source", source,
                     "--json", capture_output=True, text=True).stdout
            return json.loads(out)

        env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_REPOSITORY=f"{root}/restic",
                   PGHOST=f"{root}/pg", PGPORT=str(pg.port), PGUSER="postgres")
        sh("restic", "init", env=env, stdout=subprocess.DEVNULL)

        def restic_backup():
            before = dir_size(f"{root}/restic")
            t = time.time()
            dump = subprocess.Popen(["pg_dump", "-Fp", "chat"], env=env, stdout=subprocess.PIPE)
            sh("restic", "backup", "--stdin", "--stdin-filename", "chat.sql", "-q", env=env,
               stdin=dump.stdout, stdout=subprocess.DEVNULL)
            dump.wait()
            return dir_size(f"{root}/restic") - before, time.time() - t

        results = {}
        for day in (1, 2):
            if day == 2:
                rows1 = table_lines(pg, "chat")
                pg.psql("chat", day_two(args.posts))
                pg.psql("chat", "VACUUM")
                rows2 = table_lines(pg, "chat")
                changed = "\n".join(sorted(l for t in rows2 for l in rows2[t] - rows1[t])).encode()
                results["changed_rows"] = (len(changed), zstd_size(changed))
            for fmt in ("tables", "plain", "custom"):
                r = backup(fmt)
                results[(fmt, day)] = (r["bytes_read"], r["bytes_uploaded"], r["duration_ms"] / 1000)
            results[("restic", day)] = restic_backup()

        pg.psql("postgres", "CREATE DATABASE chat_reload")
        dump = subprocess.Popen(["pg_dump", "-Fc", "chat"], env=env, stdout=subprocess.PIPE)
        sh("pg_restore", "-d", "chat_reload", env=env, stdin=dump.stdout)
        dump.wait()
        r = backup("reload")
        results["reload"] = (r["bytes_read"], r["bytes_uploaded"])

        mb = lambda b: f"{b / 1e6:.2f} MB"
        raw, comp = results["changed_rows"]
        print(f"\nPostgreSQL chat database, {args.posts} posts ({int(size) / 1e6:.0f} MB on disk); "
              f"day 2 changed rows: {mb(raw)} raw, {mb(comp)} zstd-3\n")
        print("| backup | dump read | day 1 upload/added | day 2 upload/added | day 2 vs changed rows (zstd) |")
        print("| --- | --- | --- | --- | --- |")
        for fmt in ("tables", "plain", "custom"):
            read1, up1, t1 = results[(fmt, 1)]
            read2, up2, t2 = results[(fmt, 2)]
            print(f"| fleetvault {fmt} | {mb(read2)} | {mb(up1)} ({t1:.1f} s) | {mb(up2)} ({t2:.1f} s) | {up2 / comp:.2f}x |")
        r1, t1 = results[("restic", 1)]
        r2, t2 = results[("restic", 2)]
        print(f"| restic, plain pg_dump --stdin | | {mb(r1)} ({t1:.1f} s) | {mb(r2)} ({t2:.1f} s) | {r2 / comp:.2f}x |")
        tables2 = results[("tables", 2)][1]
        print(f"\nday 2, fleetvault tables vs restic: {tables2 / r2:.2f}x of restic's added bytes")
        read, up = results["reload"]
        print(f"reloaded copy (same rows, new physical order), tables format: {mb(up)} uploaded of "
              f"{mb(read)} read = {100 * up / max(1, results[('tables', 1)][1]):.2f}% of the first backup's upload")
    finally:
        if serve:
            serve.terminate()
            serve.wait()
        pg.stop()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
