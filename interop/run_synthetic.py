#!/usr/bin/env python3
"""Released Synapse 1.12's own worker code against replhub's synthetic 1.12 master (no Synapse
master at all) and checks that every row the hub sent reached the workers' handlers. Any python 3
runs this; the workers use the release venv.

    interop/run_synthetic.py --hub-cmd 'target/debug/replhub serve --synthetic 500 \\
        --synapse-version 1.12 --listen {listen}' [--release 1.12.4] [--log-dir DIR]

Sequence (each step waits for a JSON line or a line on the wire, never for a fixed time, but
the two pauses that let rows pile up):
  1. the hub starts ({listen} is a free loopback port the runner picked) and accepts;
  2. a reference reader (a plain socket here, no Synapse) sends `NAME ref` and `REPLICATE ALL
     NOW` as a 1.12 worker may, and records the hub's POSITIONs (the start tokens) and every
     RDATA after them;
  3. after --history-wait seconds, workers w2 then w1 (1.12's ReplicationClientHandler over
     ClientReplicationStreamProtocol) connect with `REPLICATE <stream> <start token>` for all 16
     streams, `federation` included, as if their database held the rows up to the start
     tokens: the hub must catch them up from its history (rows after the token, each with its
     own token, then POSITION), then send live rows; w1 sends REMOTE_SERVER_UP;
  4. with --behind-worker, w3 connects from an empty database's tokens (1), far below the
     history: it must get 1.12's `failed to handle replicate: Exception('stream <s> has fallen
     behind')` ERROR, since there is no master to fetch older rows from;
  5. after --live seconds of live rows, workers, reader and hub are stopped.

Verdict (last stdout line, exit 0 if pass), per worker and stream: the rows that reached the
worker's handler (`on_rdata`, batches resolved by 1.12's own client code) are exactly, as a
multiset, the rows the reference reader got after the start token up to the last token both
saw (at least up to the POSITION that ended the worker's catch-up); no row at or before the
start token; the catch-up delivered rows (the history was used); no ERROR sent or received
(but w3's), no exception logged (1.12 logs "Failed to parse RDATA" for a row its row type
cannot take, and the federation rows go through 1.12's `process_rows_for_federation`, which
fails on a presence state or Edu of the wrong shape), no federation row of an unknown type;
both w1 and w2 got w1's REMOTE_SERVER_UP (a 1.12 master echoes it to its sender too).
"""

import argparse
import collections
import json
import os
import queue
import re
import shlex
import socket
import sys
import threading
import time

from run_pair import (Proc, default_venv_dir, free_loopback_port, no_venv_verdict, print_verdict, start_hub,
                      stop_process, venv_python, wait_for_event)

FALLEN_BEHIND = re.compile(r"^ERROR failed to handle replicate: Exception\('stream [a-z_]+ has fallen behind'\)$")


class Reference:
    """A reader on a plain socket: `REPLICATE ALL NOW`, then every line, PINGs every 4 s."""

    def __init__(self, port, log_dir):
        self.sock = socket.create_connection(("127.0.0.1", port), 5)
        self.sock.settimeout(0.5)
        self.lines = []
        self.lock = threading.Lock()
        self.stopped = False
        self.log = open(os.path.join(log_dir, "ref.lines"), "w") if log_dir else None
        self.sock.sendall(b"NAME ref\nREPLICATE ALL NOW\n")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        last_ping = time.monotonic()
        while not self.stopped:
            if time.monotonic() - last_ping > 4:
                last_ping = time.monotonic()
                try:
                    self.sock.sendall(b"PING %d\n" % int(time.time() * 1000))
                except OSError:
                    return
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            *complete, buf = buf.split(b"\n")
            with self.lock:
                for raw in complete:
                    line = raw.decode("utf-8")
                    self.lines.append(line)
                    if self.log:
                        self.log.write(line + "\n")

    def snapshot(self):
        with self.lock:
            return list(self.lines)

    def stop(self):
        self.stopped = True
        self.sock.close()


def positions(lines):
    out = {}
    for line in lines:
        if line.startswith("POSITION "):
            _, stream, token = line.split(" ")
            out.setdefault(stream, int(token))
    return out


def resolved_rows(lines):
    """{stream: [(token, row JSON text)]} of the RDATA lines, `batch` rows with their run's token."""
    out = collections.defaultdict(list)
    open_runs = collections.defaultdict(list)
    for line in lines:
        if not line.startswith("RDATA "):
            continue
        _, stream, token, row = line.split(" ", 3)
        open_runs[stream].append(json.dumps(json.loads(row), sort_keys=True))
        if token != "batch":
            out[stream].extend((int(token), r) for r in open_runs.pop(stream))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--release", default="1.12.4")
    ap.add_argument("--venv-dir", default=default_venv_dir())
    ap.add_argument("--hub-cmd", required=True, help="command template with {listen}")
    ap.add_argument("--history-wait", type=float, default=1.5,
                    help="seconds of rows the hub holds before the workers connect")
    ap.add_argument("--live", type=float, default=2.0, help="seconds of live rows after both caught up")
    ap.add_argument("--behind-worker", action="store_true",
                    help="a worker from an empty database's tokens, which the history cannot serve")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--rsu-server", default="remote.example.org")
    ap.add_argument("--log-dir")
    args = ap.parse_args()

    py = venv_python(args.release, args.venv_dir)
    if not os.path.exists(py):
        return no_venv_verdict(args.release, py)
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    deadline = time.monotonic() + args.timeout
    lifetime = str(int(args.timeout + 30))
    events = queue.Queue()
    procs = {}
    hub = ref = None
    failures = []
    workers = ["w1", "w2"]

    def wait_for(name, kind):
        return wait_for_event(events, deadline, name, kind)

    def start_worker(name, extra):
        procs[name] = Proc(name, [py, "worker.py", "--release", args.release, "--connect", listen,
                                  "--name", name, "--seconds", lifetime] + extra, events, args.log_dir)

    start = {}
    try:
        port = free_loopback_port()
        listen = "127.0.0.1:%d" % port
        hub = start_hub(shlex.split(args.hub_cmd.format(listen=listen)), args.log_dir, port, deadline)
        ref = Reference(port, args.log_dir)
        while len(start) < 16:
            if time.monotonic() > deadline:
                raise TimeoutError("ref: %d POSITIONs" % len(start))
            time.sleep(0.05)
            start = positions(ref.snapshot())
        time.sleep(args.history_wait)
        tokens = json.dumps(start)
        start_worker("w2", ["--start-tokens", tokens])
        wait_for("w2", "caught_up")
        start_worker("w1", ["--start-tokens", tokens, "--send-remote-server-up", args.rsu_server])
        wait_for("w1", "caught_up")
        if args.behind_worker:
            workers.append("w3")
            start_worker("w3", [])
            wait_for("w3", "error_received")
            procs["w3"].stop()
        live_end = time.monotonic() + args.live
        while time.monotonic() < live_end or not all(
                any(e.get("event") == "remote_server_up" for e in procs[w].lines) for w in ("w1", "w2")):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except (TimeoutError, RuntimeError) as e:
        failures.append(str(e))
    finally:
        for name in workers:
            if name in procs:
                procs[name].stop()
        if ref is not None:
            ref.stop()
        if hub is not None:
            stop_process(hub)
        time.sleep(0.2)  # let the reader threads drain

    report = {"event": "verdict", "release": args.release, "mode": "synthetic", "workers": {}}
    ref_lines = ref.snapshot() if ref else []
    ref_rows = resolved_rows(ref_lines)
    report["ref_rows"] = sum(len(v) for v in ref_rows.values())
    report["ref_streams"] = sorted(ref_rows)
    for w in ("w1", "w2"):
        if w not in procs or not start:
            continue
        lines = procs[w].lines
        got = collections.defaultdict(list)
        for e in lines:
            if e.get("event") == "rdata":
                got[e["stream"]].append((e["token"], json.dumps(e["row"], sort_keys=True)))
        caught = {}
        for e in lines:
            if e.get("event") == "position":
                caught.setdefault(e["stream"], e["token"])
        missing = unexpected = old = caught_up_rows = 0
        for stream, from_token in start.items():
            mine = got.get(stream, [])
            theirs = ref_rows.get(stream, [])
            ref_last = theirs[-1][0] if theirs else from_token
            mine_last = max([t for t, _ in mine] + [caught.get(stream, from_token)])
            upto = min(ref_last, mine_last)
            if stream not in caught:
                failures.append("%s: no POSITION for %s" % (w, stream))
            want = collections.Counter(r for r in theirs if from_token < r[0] <= upto)
            have = collections.Counter(r for r in mine if r[0] <= upto)
            old += sum(1 for t, _ in mine if t <= from_token)
            caught_up_rows += sum(1 for t, _ in mine if t <= caught.get(stream, from_token))
            lost, extra = want - have, have - want
            missing += sum(lost.values())
            unexpected += sum(extra.values())
            if lost:
                failures.append("%s: %s: %d rows missing, e.g. %s" % (w, stream, sum(lost.values()),
                                                                      list(lost)[:2]))
            if extra:
                failures.append("%s: %s: %d rows the hub never sent (or twice), e.g. %s"
                                % (w, stream, sum(extra.values()), list(extra)[:2]))
        rsu = [e["server"] for e in lines if e.get("event") == "remote_server_up"]
        bad = [e for e in lines if e.get("event") in ("exception", "error_received", "error_sent", "error")
               or (e.get("event") == "log" and e.get("logger", "").startswith("synapse.federation"))]
        report["workers"][w] = {
            "rows": sum(len(v) for v in got.values()), "streams": sorted(got), "missing": missing,
            "unexpected": unexpected, "at_or_before_start": old, "caught_up_rows": caught_up_rows,
            "positions": len(caught), "remote_server_up": rsu, "problems": len(bad),
        }
        if old:
            failures.append("%s: %d rows at or before its start token" % (w, old))
        if not caught_up_rows:
            failures.append("%s: no row came by catch-up (the history was not used)" % w)
        if args.rsu_server not in rsu:
            failures.append("%s: REMOTE_SERVER_UP %s not received (a 1.12 master echoes it to all)"
                            % (w, args.rsu_server))
        for e in bad[:5]:
            failures.append("%s: %s" % (w, json.dumps(e)[:500]))
    if "w3" in procs:
        errors = [e.get("line", "") for e in procs["w3"].lines if e.get("event") == "error_received"]
        report["workers"]["w3"] = {"errors_received": errors[:3]}
        if not errors or not all(FALLEN_BEHIND.match(line) for line in errors):
            failures.append("w3: expected only 1.12's 'has fallen behind' ERROR, got %s" % errors[:3])
        bad = [e for e in procs["w3"].lines if e.get("event") in ("exception", "error_sent", "error")]
        for e in bad[:3]:
            failures.append("w3: %s" % json.dumps(e)[:500])
    return print_verdict(report, failures)


if __name__ == "__main__":
    sys.exit(main())
