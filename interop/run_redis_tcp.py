#!/usr/bin/env python3
"""A released Synapse's TCP replication worker behind `replhub serve --upstream-redis`, fed by a
current Synapse's main process replicating over a real Redis. Any python 3 runs this; the
nodes use the venvs of scripts/interop-setup (the worker's release) and
scripts/redis-interop-setup (the main process).

    interop/run_redis_tcp.py --redis 127.0.0.1:R --hub 127.0.0.1:L [--release 1.66.0] \\
        [--rounds 3] [--server-name example.com] [--timeout 60] [--log-dir DIR]

where replhub runs as `replhub serve --upstream-redis redis://127.0.0.1:R --listen
127.0.0.1:L --server-name example.com` (the caller starts both; the main process connects to
the Redis, the worker to replhub).

Sequence (each step waits for a JSON line, never for a fixed time):
  1. the main process (redis_node.py, Synapse's own Redis code) connects and publishes its
     REPLICATE;
  2. the worker (worker.py, the release's own TCP client) connects to replhub, which greets it
     and, on its REPLICATE, publishes one on the Redis: the main process answers with its
     POSITIONs, which must reach the worker (`caught_up` on the streams the main process
     announces and the release knows); the worker then sends REMOTE_SERVER_UP, which must
     reach the main process's notifier over the Redis (and the worker itself, as its echo);
  3. the main process writes --rounds rounds (typing, receipts, to_device, push_rules and a
     two-row `batch` of caches per token), published as RDATA; every row must reach the
     worker's data handler exactly once.

Version skew, not replhub's doing, is allowed and checked as such: a current Synapse announces
streams the release does not know (the worker logs "Got POSITION for unknown stream"), and its
receipts rows carry `thread_id`, which the row type of 1.22–1.66 does not take (each one logs
"Failed to parse RDATA: 'receipts'" and is dropped by the worker, as it would be from a master of
that release). Anything else logged at WARNING or above, any ERROR on the worker's connection, any
row missing, extra or duplicated fails.

Verdict: the last stdout line (JSON), exit 0 if pass.
"""

import argparse
import collections
import json
import os
import queue
import sys
import time

from run_pair import Proc, default_venv_dir, print_verdict, pump_events, venv_python, wait_for_event

# Streams whose rows a current Synapse writes in a shape this harness's worker release cannot
# parse, and why.
SKEW = {"receipts": "receipts rows gained thread_id (6 fields) after 1.66 (5 up to then)"}


def expected_rows(published):
    """(stream, token, row JSON text) for every RDATA line published, `batch` rows taking the
    token of the numbered row that ends their run."""
    rows, pending = [], collections.defaultdict(list)
    for line in published:
        if not line.startswith("RDATA "):
            continue
        _, stream, _instance, token, row = line.split(" ", 4)
        pending[stream].append(row)
        if token != "batch":
            rows.extend((stream, int(token), r) for r in pending.pop(stream))
    return rows


def canonical(row):
    return json.dumps(json.loads(row) if isinstance(row, str) else row, sort_keys=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--redis", required=True, help="127.0.0.1:PORT of the real Redis")
    ap.add_argument("--hub", required=True, help="127.0.0.1:PORT of replhub's TCP listener")
    ap.add_argument("--release", default="1.66.0", help="the worker's Synapse release")
    ap.add_argument("--venv-dir", default=default_venv_dir())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--server-name", default="example.com")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--rsu-server", default="remote.example.org")
    ap.add_argument("--log-dir", help="keep each process's JSON lines and stderr here")
    args = ap.parse_args()

    report = {"event": "verdict", "release": args.release}
    failures = []
    redis_py = os.path.join(args.venv_dir, "venv-redis", "bin", "python")
    worker_py = venv_python(args.release, args.venv_dir)
    for py, setup in [(redis_py, "scripts/redis-interop-setup"), (worker_py, "scripts/interop-setup " + args.release)]:
        if not os.path.exists(py):
            return print_verdict(report, ["no venv at %s: run %s" % (py, setup)])
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    deadline = time.monotonic() + args.timeout
    lifetime = str(int(args.timeout + 30))
    events = queue.Queue()
    procs = {}

    def lines(name, kind):
        return [e for e in procs[name].lines if e.get("event") == kind]

    def pump(until):
        return pump_events(until, events, procs, failures, deadline)

    published_before = 0
    try:
        procs["master"] = Proc("master", [
            redis_py, "redis_node.py", "--role", "master", "--name", "master", "--redis", args.redis,
            "--server-name", args.server_name, "--seconds", lifetime, "--connect-on-stdin"],
            events, args.log_dir)
        master = wait_for_event(events, deadline, "master", "started")
        procs["master"].send("connect")
        # Its own REPLICATE comes back to it (pub/sub echoes): then it is subscribed.
        if not pump(lambda: any(e["name"] == "REPLICATE" for e in lines("master", "command"))):
            raise RuntimeError("the main process never received its own REPLICATE")
        replicates_before = len([e for e in lines("master", "command") if e["name"] == "REPLICATE"])

        procs["w1"] = Proc("w1", [
            worker_py, "worker.py", "--release", args.release, "--connect", args.hub, "--name", "w1",
            "--server-name", args.server_name, "--seconds", lifetime,
            "--send-remote-server-up", args.rsu_server, "--expect", ",".join(master["replicates"])],
            events, args.log_dir)
        if not pump(lambda: lines("w1", "caught_up")):
            raise RuntimeError("the worker never had a POSITION for every stream the main process announces")
        report["caught_up"] = lines("w1", "caught_up")[0]["streams"]
        report["replicates_from_hub"] = len(
            [e for e in lines("master", "command") if e["name"] == "REPLICATE"]) - replicates_before
        if report["replicates_from_hub"] < 1:
            failures.append("the worker's REPLICATE was not published on the Redis")
        # Worker -> Redis: its REMOTE_SERVER_UP reaches the main process, and comes back to it.
        if not pump(lambda: any(e["server"] == args.rsu_server for e in lines("master", "remote_server_up"))
                    and lines("w1", "remote_server_up")):
            failures.append("REMOTE_SERVER_UP from the worker did not reach the main process and back")

        published_before = len(lines("master", "published"))
        procs["master"].send("write %d" % args.rounds)
        wait_for_event(events, deadline, "master", "written")

        def written():
            return expected_rows([e["line"] for e in lines("master", "published")[published_before:]])

        def skewed():
            return [e for e in lines("w1", "exception")
                    if any("Failed to parse RDATA: '%s'" % s in e.get("exception", "") for s in SKEW)]

        def complete():
            rows = written()
            want = [r for r in rows if r[0] not in SKEW]
            got = len(lines("w1", "rdata"))
            # Each skewed RDATA line fails on its own (a `batch` run too).
            skew_lines = sum(1 for e in lines("master", "published")[published_before:]
                             if e["line"].split(" ")[1:2] and e["line"].split(" ")[1] in SKEW)
            return rows and got >= len(want) and len(skewed()) >= skew_lines

        if not pump(complete):
            failures.append("rows not all delivered within %ss" % args.timeout)
        settle = time.monotonic() + args.settle
        while time.monotonic() < settle:
            try:
                events.get(timeout=0.1)
            except queue.Empty:
                pass
    except (RuntimeError, TimeoutError) as e:
        failures.append(str(e))
    finally:
        # What the processes log from here on (lost connections) is their shutdown.
        stop_t = time.time()
        for p in procs.values():
            p.send("quit")
            p.stop()

    if "w1" in procs and "master" in procs:
        rows = expected_rows([e["line"] for e in lines("master", "published")[published_before:]])
        want = collections.Counter((s, t, canonical(r)) for s, t, r in rows if s not in SKEW)
        got = collections.Counter((e["stream"], e["token"], canonical(e["row"])) for e in lines("w1", "rdata"))
        missing, extra = want - got, got - want
        for (s, t, r), n in sorted(missing.items()):
            failures.append("w1 missing %s %s %s (x%d)" % (s, t, r, n))
        for (s, t, r), n in sorted(extra.items()):
            failures.append("w1 got unexpected or duplicate %s %s %s (x%d)" % (s, t, r, n))
        report["rows_written"] = len(rows)
        report["rows_received"] = sum(got.values())
        report["streams_written"] = sorted({s for s, _, _ in rows})
        for name in ("master", "w1"):
            for e in procs[name].lines:
                kind = e.get("event")
                if kind == "stopping" or e.get("t", 0) >= stop_t:
                    break
                if kind in ("error_received", "error_sent"):
                    failures.append("%s: %s %s" % (name, kind, e.get("line")))
                elif kind == "exception":
                    if name == "w1" and any("Failed to parse RDATA: '%s'" % s in e.get("exception", "")
                                            for s in SKEW):
                        continue
                    failures.append("%s: exception %s %s" % (name, e.get("message"), e.get("exception")))
                elif kind == "log":
                    if name == "w1" and e.get("message", "").startswith("Got POSITION for unknown stream: "):
                        continue
                    failures.append("%s: log %s %s" % (name, e.get("level"), e.get("message")))
                elif kind in ("error", "non_json"):
                    failures.append("%s: %s" % (name, e))
        report["skew"] = {s: why for s, why in SKEW.items()}
    return print_verdict(report, failures)


if __name__ == "__main__":
    sys.exit(main())
