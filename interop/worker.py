"""A released Synapse's worker-side TCP replication client, over an in-memory homeserver.

    ~/.cache/replhub-interop/venv-1.22.1/bin/python interop/worker.py --release 1.22.1 \
        --connect 127.0.0.1:PORT --http 127.0.0.1:HTTP_PORT --name w1 --seconds 60

The connection is Synapse's own: 1.12 ReplicationClientHandler.start_replication builds its
ReplicationClientFactory / ClientReplicationStreamProtocol; 1.13+ ReplicationCommandHandler
.start_replication builds DirectTcpReplicationClientFactory / ClientReplicationStreamProtocol,
and the command handler hands rows to the data handler. The harness subclasses the data handler
(1.12: ReplicationClientHandler, 1.13+: ReplicationDataHandler) the way Synapse's GenericWorker
does, records what reaches it and then runs the release's own handling.

Stdout: JSON lines (see README.md).
"""

import argparse
import json
import sys
import urllib.parse

import harness
from harness import emit
from twisted.internet import reactor


def hostport(s):
    host, port = s.rsplit(":", 1)
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise argparse.ArgumentTypeError("only loopback addresses: %s" % s)
    return host, int(port)


class WorkerTap(harness.Tap):
    def on_line(self, conn, direction, line):
        if line.startswith("ERROR"):
            emit("error_received" if direction == "in" else "error_sent", conn=conn, line=line)
        elif self.trace:
            emit("line_in" if direction == "in" else "line_out", conn=conn, line=line)


class SimpleHttpClient:
    """The part of Synapse's SimpleHttpClient the replication HTTP client uses (GET with query
    args, POST/PUT JSON), over twisted's Agent. Errors become Synapse's HttpResponseException, as
    the real client raises them."""

    def __init__(self):
        from twisted.web.client import Agent

        self.agent = Agent(reactor)

    async def _request(self, method, uri, body=None, headers=None):
        import io

        from synapse.api.errors import HttpResponseException
        from synapse.logging.context import make_deferred_yieldable
        from twisted.web.client import FileBodyProducer, readBody
        from twisted.web.http_headers import Headers

        producer = None
        if body is not None:
            producer = FileBodyProducer(io.BytesIO(json.dumps(body).encode()))
        h = Headers({b"Content-Type": [b"application/json"]})
        # Synapse's logging-context rules: a Deferred that runs later is awaited through
        # make_deferred_yieldable, as Synapse's own client does.
        resp = await make_deferred_yieldable(self.agent.request(method, uri.encode(), h, producer))
        data = await make_deferred_yieldable(readBody(resp))
        if not 200 <= resp.code < 300:
            raise HttpResponseException(resp.code, resp.phrase.decode(), data)
        return json.loads(data)

    async def get_json(self, uri, args=None, headers=None):
        if args:
            uri += "?" + urllib.parse.urlencode(args, doseq=True)
        emit("http_get", uri=uri)
        return await self._request(b"GET", uri)

    async def post_json_get_json(self, uri, post_json, headers=None):
        return await self._request(b"POST", uri, post_json)

    async def put_json(self, uri, json_body, args=None, headers=None):
        return await self._request(b"PUT", uri, json_body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--release", required=True)
    ap.add_argument("--connect", type=hostport, required=True)
    ap.add_argument("--http", type=hostport, default=None,
                    help="the master's replication HTTP listener (1.13+ catch-up)")
    ap.add_argument("--server-name", default="example.com")
    ap.add_argument("--name", default="w1")
    ap.add_argument("--send-remote-server-up", metavar="HOST")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--trace", action="store_true", help="also print every line each way")
    ap.add_argument("--log-file")
    ap.add_argument("--start-tokens", type=json.loads, metavar="JSON",
                    help="1.12: replicate exactly these streams, from these tokens (a database that "
                         "holds the rows up to them), e.g. '{\"events\": 1000, \"federation\": 5}'; "
                         "federation rows then also go through 1.12's federation sender parsing")
    ap.add_argument("--expect", metavar="STREAMS",
                    help="comma-separated streams whose POSITION makes the worker caught up, of those its "
                         "release knows (default: "
                         "every stream of its release but federation); for writers of another "
                         "release, e.g. behind a Redis")
    args = ap.parse_args()

    harness.start_process(args)

    tap = WorkerTap()
    tap.trace = args.trace
    http_host, http_port = args.http or (args.connect[0], None)
    if http_host != args.connect[0]:
        # Synapse's replication HTTP client uses worker_replication_host for both listeners.
        emit("error", message="--http must be on the same host as --connect")
        sys.exit(2)
    config = harness.make_config("synapse.app.generic_worker", args.name, args.connect[0],
                                 args.connect[1], http_port)
    db = harness.Db()
    # The worker's own positions, starting where an empty database starts.
    tokens = harness.WorkerPositions()
    hs = harness.finish_hs(harness.StubHomeServer(config, tap, db, tokens, args.name))
    http_client = SimpleHttpClient()
    hs.get_simple_http_client = lambda: http_client
    hs.get_replication_client = lambda: http_client

    from synapse.replication.tcp.streams import STREAMS_MAP

    # Streams a master of the same release publishes (it sends federation itself).
    expected = set(STREAMS_MAP) - {"federation"}
    if args.expect:
        # Those of them the release knows: a newer writer announces streams it has never seen.
        expected = set(args.expect.split(",")) & expected
    start_tokens = {}
    if args.start_tokens is not None:
        if harness.FAMILY != 112:
            emit("error", message="--start-tokens is for 1.10-1.12 workers")
            sys.exit(2)
        start_tokens = {s: int(t) for s, t in args.start_tokens.items()}
        expected = set(start_tokens)
        for s, t in start_tokens.items():
            if s in tokens.pos:
                tokens.pos[s] = t
    state = {"positions": set(), "caught_up": False, "rsu_sent": False}

    def record_rdata(stream_name, token, rows):
        for row in rows:
            emit("rdata", stream=stream_name, token=token, row=harness.row_to_json(row))

    def record_position(stream_name, token):
        emit("position", stream=stream_name, token=token)
        state["positions"].add(stream_name)
        if not state["caught_up"] and expected <= state["positions"]:
            state["caught_up"] = True
            emit("caught_up", streams=sorted(state["positions"]))
            if args.send_remote_server_up and not state["rsu_sent"]:
                state["rsu_sent"] = True
                send_rsu(args.send_remote_server_up)
                emit("remote_server_up_sent", server=args.send_remote_server_up)

    if harness.FAMILY == 112:
        from synapse.replication.tcp.client import ReplicationClientHandler

        class RecordingHandler(ReplicationClientHandler):
            """As GenericWorkerReplicationHandler: the store is kept up to date by the base."""

            async def on_rdata(self, stream_name, token, rows):
                record_rdata(stream_name, token, rows)
                if stream_name in start_tokens and stream_name not in tokens.pos:
                    start_tokens[stream_name] = max(start_tokens[stream_name], token)
                if stream_name == "federation":
                    # What 1.12's federation sender does with them (only it replicates this
                    # stream): parse each row's data into its presence state or Edu.
                    from synapse.federation.send_queue import process_rows_for_federation

                    process_rows_for_federation(harness.Dummy("federation_sender"), rows)
                await super().on_rdata(stream_name, token, rows)

            async def on_position(self, stream_name, token):
                await super().on_position(stream_name, token)
                if stream_name in start_tokens and stream_name not in tokens.pos:
                    start_tokens[stream_name] = max(start_tokens[stream_name], token)
                record_position(stream_name, token)

            def on_remote_server_up(self, server):
                emit("remote_server_up", server=server)
                super().on_remote_server_up(server)

            def get_streams_to_replicate(self):
                # A 1.12 worker asks for each stream from the position its store has.
                return {s: tokens.pos.get(s, start_tokens.get(s, harness.FIRST)) for s in expected}

            def update_connection(self, connection):
                emit("connection", state="up" if connection else "down")
                super().update_connection(connection)

        handler = RecordingHandler(hs.get_datastore())
        send_rsu = handler.send_remote_server_up
        handler.start_replication(hs)
    else:
        import inspect

        from synapse.replication.tcp.client import ReplicationDataHandler

        class RecordingDataHandler(ReplicationDataHandler):
            """As GenericWorkerReplicationHandler: record, then the release's own handling."""

            async def on_rdata(self, stream_name, instance_name, token, rows):
                record_rdata(stream_name, token, rows)
                await super().on_rdata(stream_name, instance_name, token, rows)

            async def on_position(self, stream_name, *args):
                await super().on_position(stream_name, *args)
                record_position(stream_name, args[-1])

            def on_remote_server_up(self, server):
                emit("remote_server_up", server=server)
                super().on_remote_server_up(server)

        params = list(inspect.signature(ReplicationDataHandler.__init__).parameters)
        data_handler = RecordingDataHandler(hs if params[1] == "hs" else hs.get_datastore())
        hs.get_replication_data_handler = lambda: data_handler
        command_handler = hs.get_tcp_replication()
        send_rsu = command_handler.send_remote_server_up

        orig_new, orig_lost = command_handler.new_connection, command_handler.lost_connection

        def new_connection(conn):
            emit("connection", state="up")
            orig_new(conn)

        def lost_connection(conn):
            emit("connection", state="down")
            orig_lost(conn)

        # Instance attributes shadowing the bound methods: observation only, the originals run.
        command_handler.new_connection = new_connection
        command_handler.lost_connection = lost_connection
        command_handler.start_replication(hs)

    emit("started", release=harness.synapse.__version__, name=args.name, expect=sorted(expected))
    reactor.run()


if __name__ == "__main__":
    main()
