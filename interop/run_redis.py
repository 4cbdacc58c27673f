#!/usr/bin/env python3
"""Runs Synapse's own Redis replication code as one main process and N workers through a given
Redis (or anything speaking Redis pub/sub: `replhub serve --resp-listen`) and checks what each
process saw. Any python 3 runs this; the nodes use the venv of scripts/redis-interop-setup.

    interop/run_redis.py --redis 127.0.0.1:6379 [--worker-redis ADDR] [--workers 2] [--rounds 3]
                         [--log-dir DIR]

With --worker-redis the workers connect there and the master to --redis (two replhubs bridged
to one real Redis, say); a PUBLISH reply then counts the receivers on the publisher's own
server, as replhub's does.

Sequence (each step waits for a JSON line, never for a fixed time):
  1. every node (redis_node.py) starts; the master connects, and once its REPLICATE is
     published (so its SUBSCRIBE is confirmed) the next node connects: w1, w2, ...; then each
     node's announcement of its positions in answer to the last REPLICATE is awaited;
  2. live phase: the master writes --rounds rounds (RDATA typing/receipts/to_device/push_rules
     and a two-row `batch` of caches per token), every worker writes one caches token of its
     own (RDATA caches wN), w1 sends USER_IP (to <server_name>/USER_IP), USER_SYNC and
     REMOTE_SERVER_UP;
  3. once every live message reached every process that subscribes to its channel (or
     --timeout passes), --settle seconds let duplicates or late errors surface; all stop.

"Live" messages are everything published in step 2: RDATA, USER_IP, USER_SYNC,
REMOTE_SERVER_UP and POSITIONs that move a token. The handshake (REPLICATE and the POSITION
announcements answering each one) depends on start order, so it is only compared as a set.

Verdict (last stdout line, exit 0 if pass): every live message was received exactly once by
every process subscribed to its channel (the publisher included: Redis echoes) and by no other,
in its publisher's order; each PUBLISH reply equals that number of receivers; every RDATA
reached the data handler of every process but its writer, USER_SYNC the master's presence
handler, REMOTE_SERVER_UP every notifier; nothing logged at WARNING or above, no exception, no
failed PUBLISH, no node exited early.

`comparable` in the verdict is what must not differ between two correct servers: per receiver
and publisher the live lines in order, per receiver the set of handshake lines, per publisher
the PUBLISH replies, with the one volatile field replaced: USER_SYNC's instance id (random per
process start) becomes `<id:NAME>`.
"""

import argparse
import json
import os
import queue
import subprocess
import sys
import time

from run_pair import Proc, pump_events

HERE = os.path.dirname(os.path.abspath(__file__))


class Abort(Exception):
    """A step failed (already in `failures`): skip to stopping the nodes."""


def is_live(line):
    """Not handshake: REPLICATE and POSITION announcements (prev == new) are handshake."""
    name, _, rest = line.partition(" ")
    if name == "REPLICATE":
        return False
    if name == "POSITION":
        parts = rest.split(" ")
        return len(parts) == 4 and parts[2] != parts[3]
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--redis", required=True, help="127.0.0.1:PORT")
    ap.add_argument("--worker-redis", help="the workers' server, if not --redis")
    ap.add_argument("--venv-dir", default=os.environ.get(
        "REPLHUB_INTEROP_DIR", os.path.expanduser("~/.cache/replhub-interop")))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--server-name", default="example.com")
    ap.add_argument("--python-parser", default="w2",
                    help="comma-separated nodes that run txredisapi without hiredis")
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--settle", type=float, default=0.5)
    ap.add_argument("--rsu-server", default="remote.example.org")
    ap.add_argument("--log-dir", help="keep each node's JSON lines and stderr here")
    args = ap.parse_args()

    py = os.path.join(args.venv_dir, "venv-redis", "bin", "python")
    if not os.path.exists(py):
        print(json.dumps({"event": "verdict", "pass": False,
                          "failures": ["no venv at %s: run scripts/redis-interop-setup" % py]}))
        return 1
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    sn = args.server_name
    names = ["master"] + ["w%d" % i for i in range(1, args.workers + 1)]
    python_parser = set(filter(None, args.python_parser.split(",")))
    deadline = time.monotonic() + args.timeout
    events = queue.Queue()
    procs = {}
    failures = []
    lifetime = str(int(args.timeout + 30))  # every node also stops itself

    def pump(until):
        return pump_events(until, events, procs, failures, deadline)

    def published(name):
        return [e for e in procs[name].lines if e.get("event") == "published"]

    def started(name):
        return next(e for e in procs[name].lines if e.get("event") == "started")

    def received(name):
        return [e["line"] for e in procs[name].lines if e.get("event") == "command"]

    live_from = {}  # publisher -> first `published` seq of the live phase
    try:
        # 1. start together (importing Synapse takes seconds), connect one at a time, each
        # subscribed before the next
        for name in names:
            argv = [py, "redis_node.py", "--role", "master" if name == "master" else "worker",
                    "--name", name, "--redis", redis_of(args, name), "--server-name", sn,
                    "--seconds", lifetime, "--connect-on-stdin"]
            if name in python_parser:
                argv.append("--no-hiredis")
            procs[name] = Proc(name, argv, events, args.log_dir)
        for name in names:
            if not pump(lambda n=name: any(e.get("event") == "started" for e in procs[n].lines)):
                failures.append("%s did not start" % name)
                raise Abort()
            procs[name].send("connect")
            if not pump(lambda n=name: any(e["line"] == "REPLICATE " for e in published(n))):
                failures.append("%s: REPLICATE not published" % name)
                raise Abort()
        # The last node's REPLICATE has every node announce its positions once more. The live
        # phase starts when each node has published a full announcement after the last
        # REPLICATE it receives (node i receives one from itself and each later node), so the
        # handshake each node sees does not depend on timing.
        def announced(i, name):
            reps = [e for e in procs[name].lines
                    if e.get("event") == "command" and e["name"] == "REPLICATE"]
            if len(reps) < len(names) - i:
                return False
            after = reps[-1]["pub_seq"]
            done = {e["line"].split(" ")[1] for e in published(name)
                    if e["seq"] > after and e["line"].startswith("POSITION ")}
            return set(started(name)["replicates"]) <= done

        if not pump(lambda: all(announced(i, n) for i, n in enumerate(names))):
            failures.append("handshake: not every node announced its positions after the last REPLICATE")
            raise Abort()
        for name in names:
            live_from[name] = max(e["seq"] for e in published(name)) + 1

        # 2. live phase
        procs["master"].send("write %d" % args.rounds)
        for name in names[1:]:
            procs[name].send("write 1")
        procs["w1"].send("user_ip")
        procs["w1"].send("user_sync")
        procs["w1"].send("remote_server_up %s" % args.rsu_server)
        # RDATA lines per token: 1 per master stream, 2 for caches (a batch).
        expect = {"master": args.rounds * 6}
        for name in names[1:]:
            expect[name] = 2 + (3 if name == "w1" else 0)

        def live(name):
            return [e for e in published(name) if e["seq"] >= live_from[name] and is_live(e["line"])]

        def receivers(channel):
            return ["master"] if channel == sn + "/USER_IP" else names

        def all_delivered():
            for p in names:
                msgs = live(p)
                if len(msgs) < expect[p]:
                    return False
                for m in msgs:
                    for r in receivers(m["channel"]):
                        if m["line"] not in received(r):
                            return False
            return True

        if not pump(all_delivered):
            failures.append("live messages not all delivered within %ss" % args.timeout)
        # Settle: duplicates and late errors have a moment to show up.
        deadline = time.monotonic() + args.settle
        pump(lambda: False)
    except Abort:
        pass
    finally:
        # One SIGTERM each (Twisted's handler stops the reactor; a second one while it is
        # stopping would log ReactorNotRunning), all at once, then wait for each.
        for p in procs.values():
            p.stopping = True
            if p.p.poll() is None:
                p.p.terminate()
        for p in procs.values():
            try:
                p.p.wait(5)
            except subprocess.TimeoutExpired:
                p.p.kill()
                p.p.wait()
        time.sleep(0.2)  # the reader threads drain the last lines of exited processes

    report = verdict(args, names, procs, live_from, failures)
    print(json.dumps(report, separators=(",", ":")))
    return 0 if report["pass"] else 1


def redis_of(args, name):
    """The server a node connects to."""
    return args.redis if name == "master" else (args.worker_redis or args.redis)


def verdict(args, names, procs, live_from, failures):
    sn = args.server_name
    nodes = {}
    ids = {}
    for name in names:
        lines = procs[name].lines if name in procs else []
        started = next((e for e in lines if e.get("event") == "started"), {})
        ids[started.get("instance_id")] = name
        for e in lines:
            kind = e.get("event")
            if kind in ("exception", "log", "error", "publish_failed", "non_json"):
                failures.append("%s: %s" % (name, json.dumps(e)[:400]))
        nodes[name] = {
            "parser": started.get("parser"),
            "hiredis": started.get("hiredis"),
            "replicates": started.get("replicates"),
            "published": [e for e in lines if e.get("event") == "published"],
            "received": [e["line"] for e in lines if e.get("event") == "command"],
            "rdata": [e for e in lines if e.get("event") == "rdata"],
            "user_sync_handled": [e for e in lines if e.get("event") == "user_sync_handled"],
            "remote_server_up": [e["server"] for e in lines if e.get("event") == "remote_server_up"],
        }

    def receivers(channel):
        return ["master"] if channel == sn + "/USER_IP" else names

    live = {}
    for p in names:
        start = live_from.get(p, 1 << 62)
        live[p] = [{"channel": e["channel"], "line": e["line"], "reply": e["reply"]}
                   for e in nodes[p]["published"] if e["seq"] >= start and is_live(e["line"])]
    all_live = [m["line"] for p in names for m in live[p]]
    if len(set(all_live)) != len(all_live):
        failures.append("live lines are not unique across publishers; the checks need them to be")
    origin = {m["line"]: p for p in names for m in live[p]}

    for p in names:
        for m in live[p]:
            want = receivers(m["channel"])
            for r in names:
                n = nodes[r]["received"].count(m["line"])
                if n != (1 if r in want else 0):
                    failures.append("%s received %d× %s's %r (want %d)" % (
                        r, n, p, m["line"], 1 if r in want else 0))
            local = [r for r in want if redis_of(args, r) == redis_of(args, p)]
            if m["reply"] != len(local):
                failures.append("PUBLISH %r by %s: reply %r, want %d receivers" % (
                    m["line"], p, m["reply"], len(local)))
    per_pair = {}
    for r in names:
        per_pair[r] = {}
        for p in names:
            got = [line for line in nodes[r]["received"] if origin.get(line) == p]
            per_pair[r][p] = got
            sent = [m["line"] for m in live[p] if r in receivers(m["channel"])]
            if got != sent and sorted(got) == sorted(sent):
                failures.append("%s received %s's messages out of order" % (r, p))

    # Past the command handler: RDATA to the data handler of every process but its writer.
    for p in names:
        for m in live[p]:
            parts = m["line"].split(" ", 4)
            if parts[0] != "RDATA" or parts[3] == "batch":
                continue
            stream, token = parts[1], int(parts[3])
            for r in names:
                if r == p:
                    continue
                n = sum(1 for e in nodes[r]["rdata"]
                        if (e["stream"], e["instance"], e["token"]) == (stream, p, token))
                if n != 1:
                    failures.append("%s: data handler got %s/%s/%d %d times" % (r, stream, p, token, n))
    if "w1" in nodes and len(nodes["master"]["user_sync_handled"]) != 1:
        failures.append("master presence handler: %d USER_SYNC" % len(nodes["master"]["user_sync_handled"]))
    for r in names:
        if nodes[r]["remote_server_up"] != [args.rsu_server]:
            failures.append("%s: REMOTE_SERVER_UP %r" % (r, nodes[r]["remote_server_up"]))

    def normalise(line):
        for instance_id, name in ids.items():
            if instance_id:
                line = line.replace(instance_id, "<id:%s>" % name)
        return line

    comparable = {
        "live": {r: {p: [normalise(x) for x in per_pair[r][p]] for p in names} for r in names},
        "handshake": {r: sorted({normalise(x) for x in nodes[r]["received"] if not is_live(x)})
                      for r in names},
        "replies": {p: [m["reply"] for m in live[p]] for p in names},
    }
    return {
        "event": "verdict",
        "pass": not failures,
        "failures": failures,
        "redis": args.redis,
        "worker_redis": args.worker_redis or args.redis,
        "live": live,
        "nodes": {n: {"parser": v["parser"], "hiredis": v["hiredis"], "replicates": v["replicates"],
                      "received": v["received"], "rdata": len(v["rdata"]),
                      "published": len(v["published"])} for n, v in nodes.items()},
        "comparable": comparable,
    }


if __name__ == "__main__":
    sys.exit(main())
