"""A released Synapse's master-side TCP replication, over an in-memory homeserver.

Run with the release's virtualenv python, e.g.

    ~/.cache/replhub-interop/venv-1.22.1/bin/python interop/master.py --release 1.22.1 \
        --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --prefill 3

Synapse's own ReplicationStreamProtocolFactory builds the connections
(ServerReplicationStreamProtocol), its ReplicationStreamer reads the streams and sends RDATA
when poked, its ReplicationCommandHandler (1.13+) answers REPLICATE and relays
REMOTE_SERVER_UP; its ReplicationGetStreamUpdates servlet answers the workers' HTTP catch-up.
The harness only writes rows into the in-memory database and pokes the notifier, as Synapse's
event persister would.

Stdout: JSON lines (see README.md). Stdin: optional commands, one per line:
  write N      write N rounds (one row to every written stream per round), then poke
  quit         stop
"""

import argparse
import json
import re
import urllib.parse

import harness
from harness import emit
from twisted.internet import defer, reactor, stdio
from twisted.protocols.basic import LineReceiver
from twisted.web import resource, server


def hostport(s):
    host, port = s.rsplit(":", 1)
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise argparse.ArgumentTypeError("only loopback addresses: %s" % s)
    return host, int(port)


class MasterTap(harness.Tap):
    def on_line(self, conn, direction, line):
        if direction == "in":
            emit("command_received", conn=conn, line=line)
        elif line.startswith("ERROR"):
            emit("error_sent", conn=conn, line=line)
        elif self.trace:
            emit("command_sent", conn=conn, line=line)


class ReplicationHttp(resource.Resource):
    """The replication HTTP listener: routes requests to the servlets registered on it.

    Stands in for Synapse's JsonResource (which needs Synapse's request/site machinery): it
    implements the same ``register_paths`` interface, calls the servlet's own handler with the
    path arguments and writes its (code, json) answer.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.routes = []

    def register_paths(self, method, path_patterns, callback, servlet_classname=None, **_):
        for pattern in path_patterns:
            self.routes.append((method.encode(), re.compile(pattern) if isinstance(pattern, str) else pattern, callback))

    def render(self, request):
        path = request.path.decode("ascii")
        for method, pattern, callback in self.routes:
            m = pattern.match(path)
            if m and request.method == method:
                kwargs = {k: urllib.parse.unquote(v) for k, v in m.groupdict().items()}
                emit("http_request", method=method.decode(), path=path,
                     query=request.uri.decode("ascii").partition("?")[2])
                d = defer.ensureDeferred(self._call(callback, request, kwargs))
                d.addCallbacks(lambda res: self._answer(request, *res), lambda f: self._fail(request, f))
                return server.NOT_DONE_YET
        request.setResponseCode(404)
        emit("http_request", method=request.method.decode(), path=path, status=404)
        return b'{"errcode":"M_UNRECOGNIZED"}'

    async def _call(self, callback, request, kwargs):
        res = callback(request, **kwargs)
        if hasattr(res, "__await__") or isinstance(res, defer.Deferred):
            res = await res
        return res

    def _answer(self, request, code, body):
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        request.write(json.dumps(body).encode())
        request.finish()

    def _fail(self, request, failure):
        emit("exception", logger="interop.http", message="servlet failed",
             exception=repr(failure.value), traceback=failure.getTraceback())
        code = getattr(failure.value, "code", 500)
        request.setResponseCode(code if isinstance(code, int) else 500)
        request.write(json.dumps({"error": repr(failure.value)}).encode())
        request.finish()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--release", required=True)
    ap.add_argument("--listen", type=hostport, required=True)
    ap.add_argument("--http-listen", type=hostport, default=("127.0.0.1", 0))
    ap.add_argument("--server-name", default="example.com")
    ap.add_argument("--prefill", type=int, default=0, help="rounds written before listening")
    ap.add_argument("--rows", type=int, default=0, help="rounds written after start")
    ap.add_argument("--rate", type=float, default=0, help="rounds per second (0: at once)")
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--trace", action="store_true", help="also print every line sent")
    ap.add_argument("--log-file")
    args = ap.parse_args()

    harness.start_process(args)

    tap = MasterTap()
    tap.trace = args.trace
    config = harness.make_config(None, None)
    db = harness.Db()
    hs = harness.finish_hs(harness.StubHomeServer(config, tap, db, db.current, "master"))

    from synapse.replication.tcp.resource import ReplicationStreamProtocolFactory

    factory = ReplicationStreamProtocolFactory(hs)
    streamer = hs.get_replication_streamer() if harness.FAMILY >= 113 else factory.streamer
    if harness.FAMILY >= 122:
        streams = {st.NAME: st for st in streamer.streams}
    elif harness.FAMILY == 113:
        streams = streamer.get_streams()
    else:
        streams = streamer.streams_by_name
    published = sorted(streams)
    writes = [s for s in published if s in harness.GENERATOR_OF and s != "user_signature"]
    # Streams sharing an id generator must be written in the generator's owner order.
    order = [s for g in harness.GENERATORS for s in harness.GENERATORS[g] if s in writes]

    def write_rounds(n):
        for _ in range(n):
            for stream in order:
                token = db.write(stream)
                for row in harness.wire_rows(stream, token):
                    emit("row_written", stream=stream, token=token, row=row)
        hs.get_notifier().on_new_replication_data()

    write_rounds(args.prefill)

    port = hs.get_reactor().listenTCP(args.listen[1], factory, interface=args.listen[0])

    http = ReplicationHttp()
    if harness.FAMILY >= 113:
        from synapse.replication.http.streams import ReplicationGetStreamUpdates

        ReplicationGetStreamUpdates(hs).register(http)
    http_port = reactor.listenTCP(args.http_listen[1], server.Site(http), interface=args.http_listen[0])

    emit("listening", port=port.getHost().port, http_port=http_port.getHost().port,
         release=harness.synapse.__version__, streams=published, writes=order,
         tokens={s: streams[s].current_token(*(["master"] if harness.FAMILY >= 122 else []))
                 for s in published})

    if args.rows:
        if args.rate > 0:
            from twisted.internet import task

            left = [args.rows]

            def tick():
                write_rounds(1)
                left[0] -= 1
                if left[0] <= 0:
                    loop.stop()

            loop = task.LoopingCall(tick)
            loop.start(1.0 / args.rate)
        else:
            reactor.callWhenRunning(write_rounds, args.rows)

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line):
            words = line.decode().split()
            if not words:
                return
            if words[0] == "write":
                write_rounds(int(words[1]) if len(words) > 1 else 1)
                emit("written", tokens={g: t for g, t in db.current.items()})
            elif words[0] == "quit":
                reactor.stop()
            else:
                emit("error", message="unknown command %r" % line)

        def connectionLost(self, reason):
            pass

    stdio.StandardIO(Commands())
    reactor.run()


if __name__ == "__main__":
    main()
