#!/usr/bin/env python3
"""Runs a released Synapse master directly against two workers of the same release and checks
that replication works end to end. Any python 3 runs this; the processes use the release venv.

    interop/run_pair.py --release 1.22.1 [--upstream-hook CMD]

Sequence (each step waits for a JSON line, never for a fixed time):
  1. master.py listens (after writing --prefill rounds), prints its ports;
  2. worker w2 connects and reports `caught_up` (POSITION handled for every stream);
  3. worker w1 connects, catches up and sends REMOTE_SERVER_UP <--rsu-server>;
  4. the master is told to write --rows more rounds (live RDATA);
  5. once both workers hold every row written (or --timeout passes), a short settle
     (--settle seconds) lets late errors surface, then everything is stopped.

Verdict (last stdout line, exit 0 if pass): both workers received every (stream, token, row)
the master wrote, no duplicates, no ERROR sent or received, no exception logged anywhere,
w2 received REMOTE_SERVER_UP; w1 received it back on 1.12 (echo to the originator) and not on
1.13+.

--hub-cmd puts a hub (replhub) between the master and the workers: a command template with
{upstream} (the master's host:port) and {listen} (a free loopback host:port the runner picked),
e.g. --hub-cmd 'target/debug/replhub --upstream {upstream} --listen {listen}'. The runner starts
it after the master listens, waits until {listen} accepts a TCP connection, points the workers
there (their HTTP catch-up still goes to the master) and stops it at the end. Its output goes to
hub.stdout/hub.stderr in --log-dir.

--allow-probe: a hub that learns a 1.10–1.12 master's generation by greeting it with `REPLICATE
ALL` gets that release's parse ERROR once (and the master logs the exception). With this flag
exactly one such rejection of `REPLICATE ALL` is expected, not counted as a failure, and
reported as "probes"; any other ERROR still fails, and so does a second probe.

--late-worker: after both workers hold every row, a third worker w3 (fresh, so its tokens are
the empty database's) connects: on 1.10–1.12 it asks for every row since its token, which a hub
serves from its history. Then --rows more rounds are written, and w3 must hold every row
written, like the others.
"""

import argparse
import json
import os
import queue
import shlex
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def venv_python(release, venv_dir):
    return os.path.join(venv_dir, "venv-" + release, "bin", "python")


def default_venv_dir():
    """Where scripts/interop-setup caches the release venvs ($REPLHUB_INTEROP_DIR overrides)."""
    return os.environ.get("REPLHUB_INTEROP_DIR", os.path.expanduser("~/.cache/replhub-interop"))


def no_venv_verdict(release, py):
    """Prints the failing verdict for a release whose venv is missing; returns the exit code."""
    print(json.dumps({"event": "verdict", "release": release, "pass": False,
                      "failures": ["no venv at %s: run scripts/interop-setup %s" % (py, release)]}))
    return 1


def print_verdict(report, failures):
    """Completes `report` with the outcome (pass when there are no failures, the first 20 of
    them listed), prints it as the last stdout line and returns the exit code."""
    report["pass"] = not failures
    report["failures"] = failures[:20] + (["... %d more" % (len(failures) - 20)] if len(failures) > 20 else [])
    print(json.dumps(report))
    return 0 if report["pass"] else 1


def wait_for_event(events, deadline, name, kind):
    """Waits for process `name` to print a JSON line whose event is `kind` and returns it.

    Lines from other processes are consumed and dropped (the runners read what they need from
    each Proc's `lines`). Raises TimeoutError at `deadline` (a time.monotonic() value) and
    RuntimeError if `name` exits first."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("%s: no %s" % (name, kind))
        try:
            who, ev = events.get(timeout=left)
        except queue.Empty:
            continue
        if who == name and ev.get("event") == kind:
            return ev
        if who == name and ev.get("event") == "exited":
            raise RuntimeError("%s exited before %s" % (name, kind))


def pump_events(until, events, procs, failures, deadline):
    """Handles the processes' events until until() is true. False at the deadline, or once a
    process in procs exits before it was asked to stop (recorded in failures)."""
    while not until():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            who, ev = events.get(timeout=min(left, 0.2))
        except queue.Empty:
            continue
        if ev.get("event") == "exited" and not procs[who].stopping:
            failures.append("%s exited early" % who)
            return False
    return True


def free_loopback_port():
    """A loopback TCP port that was free a moment ago, for a child process to listen on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_hub(argv, log_dir, port, deadline):
    """Starts the hub (argv) with its output in log_dir/hub.stdout and hub.stderr (discarded
    without log_dir) and returns its Popen once 127.0.0.1:port accepts a TCP connection.

    Raises RuntimeError if the hub exits first and TimeoutError at `deadline`, having stopped
    the hub, since the caller gets no Popen to stop then."""
    out = open(os.path.join(log_dir, "hub.stdout"), "w") if log_dir else subprocess.DEVNULL
    err = open(os.path.join(log_dir, "hub.stderr"), "w") if log_dir else subprocess.DEVNULL
    hub = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    try:
        while True:
            if hub.poll() is not None:
                raise RuntimeError("hub exited with %s before listening" % hub.returncode)
            if time.monotonic() > deadline:
                raise TimeoutError("hub: 127.0.0.1:%d never accepted a connection" % port)
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                return hub
            except OSError:
                time.sleep(0.05)
    except BaseException:
        stop_process(hub)
        raise


def stop_process(p):
    """Terminates a child that is still running, killing it if it has not exited after 5 s."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class Proc:
    """A child process whose stdout JSON lines go to a shared queue, tagged with its name."""

    def __init__(self, name, argv, events, log_dir):
        self.name = name
        self.lines = []
        # Once a process is told to stop, the ERRORs its shutdown sends are not findings.
        self.stopping = False
        err = open(os.path.join(log_dir, name + ".stderr"), "w") if log_dir else subprocess.DEVNULL
        self.out = open(os.path.join(log_dir, name + ".jsonl"), "w") if log_dir else None
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                  cwd=HERE)
        threading.Thread(target=self._read, args=(events,), daemon=True).start()

    def _read(self, events):
        for raw in self.p.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if self.out:
                self.out.write(line + "\n")
                self.out.flush()
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"event": "non_json", "line": line}
            if ev.get("event") == "stopping":
                self.stopping = True
            if not self.stopping or ev.get("event") not in ("error_sent", "error_received"):
                self.lines.append(ev)
            events.put((self.name, ev))
        events.put((self.name, {"event": "exited"}))

    def send(self, text):
        try:
            self.p.stdin.write(text.encode() + b"\n")
            self.p.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def stop(self):
        stop_process(self.p)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--release", required=True)
    ap.add_argument("--venv-dir", default=default_venv_dir())
    ap.add_argument("--prefill", type=int, default=2)
    ap.add_argument("--rows", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--rsu-server", default="remote.example.org")
    ap.add_argument("--log-dir", help="keep each process's JSON lines and stderr here")
    ap.add_argument("--hub-cmd", help="command template with {upstream} and {listen}")
    ap.add_argument("--allow-probe", action="store_true",
                    help="expect one rejection of REPLICATE ALL by a 1.10-1.12 master (a hub's probe)")
    ap.add_argument("--late-worker", action="store_true",
                    help="a third worker connects late, from an empty database's tokens")
    args = ap.parse_args()
    workers = ["w1", "w2"] + (["w3"] if args.late_worker else [])

    py = venv_python(args.release, args.venv_dir)
    if not os.path.exists(py):
        return no_venv_verdict(args.release, py)
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    deadline = time.monotonic() + args.timeout
    events = queue.Queue()
    procs = {}
    hub = None
    lifetime = str(int(args.timeout + 30))  # every child also stops itself
    failures = []

    def wait_for(name, kind):
        return wait_for_event(events, deadline, name, kind)

    def start_worker(name, extra):
        procs[name] = Proc(name, [py, "worker.py", "--release", args.release, "--connect",
                                  connect_to, "--http", "127.0.0.1:%d" % http_port,
                                  "--name", name, "--seconds", lifetime] + extra, events, args.log_dir)

    try:
        procs["master"] = Proc("master", [py, "master.py", "--release", args.release, "--listen",
                                          "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--prefill",
                                          str(args.prefill), "--seconds", lifetime], events, args.log_dir)
        listening = wait_for("master", "listening")
        port, http_port = listening["port"], listening["http_port"]
        connect_to = "127.0.0.1:%d" % port
        if args.hub_cmd:
            hub_port = free_loopback_port()
            listen = "127.0.0.1:%d" % hub_port
            argv = shlex.split(args.hub_cmd.format(upstream=connect_to, listen=listen))
            hub = start_hub(argv, args.log_dir, hub_port, deadline)
            connect_to = listen
        start_worker("w2", [])
        wait_for("w2", "caught_up")
        start_worker("w1", ["--send-remote-server-up", args.rsu_server])
        wait_for("w1", "caught_up")
        procs["master"].send("write %d" % args.rows)
        wait_for("master", "written")

        def written():
            return [(e["stream"], e["token"], json.dumps(e["row"], sort_keys=True))
                    for e in procs["master"].lines if e.get("event") == "row_written"]

        def received(name):
            return [(e["stream"], e["token"], json.dumps(e["row"], sort_keys=True))
                    for e in procs[name].lines if e.get("event") == "rdata"]

        def wait_rows(names):
            want = set(written())
            while time.monotonic() < deadline:
                if all(want <= set(received(w)) for w in names) and any(
                        e.get("event") == "remote_server_up" for e in procs["w2"].lines):
                    return
                try:
                    events.get(timeout=0.2)
                except queue.Empty:
                    pass

        wait_rows(("w1", "w2"))
        if args.late_worker:
            start_worker("w3", [])
            wait_for("w3", "caught_up")
            procs["master"].send("write %d" % args.rows)
            wait_for("master", "written")
            wait_rows(workers)
        time.sleep(args.settle)
    except (TimeoutError, RuntimeError) as e:
        failures.append(str(e))
    finally:
        # Workers first, so that the master's "ERROR server shutting down" reaches nobody.
        for name in workers:
            if name in procs:
                procs[name].stop()
        if hub is not None:
            stop_process(hub)
        if "master" in procs:
            procs["master"].stop()
        time.sleep(0.2)  # let the reader threads drain

    report = {"event": "verdict", "release": args.release, "workers": {}}
    if "master" in procs:
        master_lines = procs["master"].lines
        want = [(e["stream"], e["token"], json.dumps(e["row"], sort_keys=True))
                for e in master_lines if e.get("event") == "row_written"]
        report["rows_written"] = len(want)
        report["streams_written"] = sorted({s for s, _, _ in want})
        bad = [e for e in master_lines if e.get("event") in ("exception", "error_sent", "error")]
        if args.allow_probe:
            # The probe: the master's parse ERROR for `REPLICATE ALL` and the exception it logs.
            probe_error = ("ERROR failed to parse line for  'REPLICATE': ValueError('not enough values "
                           "to unpack (expected 2, got 1)') ('ALL'):")
            sent = [e for e in bad if e.get("event") == "error_sent" and e.get("line") == probe_error]
            logged = [e for e in bad if e.get("event") == "exception"
                      and "'REPLICATE': 'ALL'" in e.get("message", "")
                      and e.get("exception") == "ValueError('not enough values to unpack (expected 2, got 1)')"]
            report["probes"] = len(sent)
            if len(sent) > 1:
                failures.append("master: %d probes (REPLICATE ALL refused), expected at most 1" % len(sent))
            if sent:
                bad = [e for e in bad if e is not sent[0] and e is not (logged[0] if logged else None)]
        for e in bad[:5]:
            failures.append("master: %s" % json.dumps(e)[:500])
        if len(bad) > 5:
            failures.append("master: %d more errors/exceptions" % (len(bad) - 5))
        if not any(e.get("event") == "command_received" and e.get("line", "").startswith("REMOTE_SERVER_UP")
                   for e in master_lines):
            failures.append("master: no REMOTE_SERVER_UP received from w1")
        for w in workers:
            if w not in procs:
                continue
            lines = procs[w].lines
            got = [(e["stream"], e["token"], json.dumps(e["row"], sort_keys=True))
                   for e in lines if e.get("event") == "rdata"]
            missing = sorted(set(want) - set(got))
            extra = sorted(set(got) - set(want))
            dups = len(got) - len(set(got))
            rsu = [e["server"] for e in lines if e.get("event") == "remote_server_up"]
            bad = [e for e in lines if e.get("event") in ("exception", "error_received", "error_sent", "error")]
            report["workers"][w] = {
                "rows": len(got), "missing": len(missing), "unexpected": len(extra),
                "duplicates": dups, "positions": sum(1 for e in lines if e.get("event") == "position"),
                "http_gets": sum(1 for e in lines if e.get("event") == "http_get"),
                "remote_server_up": rsu, "problems": len(bad),
            }
            if missing:
                failures.append("%s: %d rows missing, e.g. %s" % (w, len(missing), missing[:3]))
            if extra:
                failures.append("%s: %d rows never written, e.g. %s" % (w, len(extra), extra[:3]))
            if dups:
                failures.append("%s: %d duplicate rows" % (w, dups))
            for e in bad[:5]:
                failures.append("%s: %s" % (w, json.dumps(e)[:500]))
        old = args.release.split(".")[:2] == ["1", "12"]
        if "w2" in report["workers"] and args.rsu_server not in report["workers"]["w2"]["remote_server_up"]:
            failures.append("w2: REMOTE_SERVER_UP %s not received" % args.rsu_server)
        if "w1" in report["workers"]:
            echoed = args.rsu_server in report["workers"]["w1"]["remote_server_up"]
            if old and not echoed:
                failures.append("w1: 1.12 master should echo REMOTE_SERVER_UP to its sender")
            if not old and echoed:
                failures.append("w1: 1.13+ master must not echo REMOTE_SERVER_UP to its sender")
    return print_verdict(report, failures)


if __name__ == "__main__":
    sys.exit(main())
