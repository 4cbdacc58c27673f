#!/usr/bin/env python3
"""One Synapse process (main process or worker) replicating over Redis with Synapse's own code.

    <venv-redis>/bin/python interop/redis_node.py --role master --name master \
        --redis 127.0.0.1:6379 [--no-hiredis] [--seconds 60]
    <venv-redis>/bin/python interop/redis_node.py --role worker --name w1 --redis 127.0.0.1:6379

Synapse's, unmodified: ``ReplicationCommandHandler`` (built from the stub homeserver, every
``Stream`` of STREAMS_MAP in it), ``start_replication`` → ``RedisDirectTcpReplicationClientFactory``
→ ``RedisSubscriber`` (SUBSCRIBE, REPLICATE, POSITIONs, parsing and dispatching messages),
``lazyConnection`` (the publishing connection), ``ReplicationStreamer`` (RDATA/POSITION when the
notifier is poked), txredisapi's protocol (with hiredis' reader unless --no-hiredis).

Stubbed: the database (tokens per (stream, writer) and rows that are a pure function of
(stream, writer, token)), the homeserver, the notifier, the presence/typing handlers and the
replication data handler (it records and advances tokens, as a slaved store would).

Observation without patching Synapse: the command handler's ``on_<NAME>`` methods are wrapped on
the instance (``RedisSubscriber.handle_command`` looks them up with getattr), so every command
that reaches the handler is printed before the handler runs; the publishing connection's
``publish`` is wrapped the same way, so every PUBLISH and its integer reply is printed.

Stdin (one command a line): ``connect`` (with --connect-on-stdin: start replication now, so a
driver can start the slow-to-import processes together and connect them in order), ``write N`` (master: N rounds of rows on its streams; worker: N
tokens of its own `caches` rows; both then poke the notifier, so Synapse's streamer publishes),
``user_ip``, ``user_sync``, ``remote_server_up HOST`` (sent with the command handler's own
send_* methods), ``quit``.

Stdout: JSON lines (see interop/README.md, "Redis harness").
"""

import argparse
import sys

# txredisapi picks its reply parser when imported: hiredis' reader if `import hiredis` works.
# Making that import fail is how the pure-Python parser is chosen; nothing in Synapse changes.
if "--no-hiredis" in sys.argv:
    sys.modules["hiredis"] = None

import harness  # noqa: E402  (after the hiredis choice; imports compat before synapse)
from harness import Dummy, StubConfig, emit  # noqa: E402

import txredisapi  # noqa: E402
from twisted.internet import reactor, stdio  # noqa: E402
from twisted.protocols import basic  # noqa: E402

# Streams whose rows this harness writes, and which writer writes them. Every process writes
# `caches` (with Redis, every instance replicates its own cache invalidations); the main
# process writes the rest. Rows sharing a token (two per `caches` token) go out as a `batch`.
MASTER_STREAMS = ["typing", "receipts", "to_device", "push_rules", "caches"]
WORKER_STREAMS = ["caches"]
# Store id generator attribute -> stream, for the written streams; any other id generator
# stays at the initial token.
ID_GENS = {
    "_receipts_id_gen": "receipts",
    "_push_rules_stream_id_gen": "push_rules",
    "_to_device_msg_id_gen": "to_device",
    "_cache_id_gen": "caches",
}
FIRST = 1


def rows_at(stream, writer, token):
    """The database rows of `stream` written by `writer` at `token`: a pure function, so a
    reader that has to catch up computes the same rows the writer streamed."""
    sn, t = harness.SERVER_NAME, token
    user = "@%s-u%d:%s" % (writer, t, sn)
    # Every other room id is non-ASCII, so Synapse's JSON escaping (`\u00fc`) crosses the wire.
    room = "!r\u00fcm%d:%s" % (t % 3, sn) if t % 2 == 0 else "!room%d:%s" % (t % 3, sn)
    if stream == "typing":
        return [(room, [user])]
    if stream == "receipts":
        return [(room, "m.read", user, "$ev%d:%s" % (t, sn), None, {"ts": 1000 * t})]
    if stream == "to_device":
        return [(user,)]
    if stream == "push_rules":
        return [(user,)]
    if stream == "caches":
        return [("get_user_by_id", [user], 1000 * t), ("get_rooms_for_user", [user], 1000 * t)]
    raise ValueError(stream)


class Tokens(dict):
    """Current token per (stream, writer); every one starts at FIRST (an empty database)."""

    def __missing__(self, key):
        return FIRST

    def advance(self, stream, writer, token):
        if token > self[(stream, writer)]:
            self[(stream, writer)] = token


async def _query(stream, instance_name, from_token, to_token, limit):
    """A stream update function: (updates, upto_token, limited), updates = [(token, row)]."""
    updates = []
    for t in range(from_token + 1, to_token + 1):
        updates.extend((t, row) for row in rows_at(stream, instance_name, t))
        if len(updates) >= limit and t < to_token:
            return updates, t, True
    return updates, to_token, False


class IdGen:
    def __init__(self, tokens, stream, local):
        self.tokens, self.stream, self.local = tokens, stream, local

    def get_current_token_for_writer(self, instance_name):
        return self.tokens[(self.stream, instance_name)]

    def get_current_token(self):
        return self.tokens[(self.stream, self.local)]

    def get_minimal_local_current_token(self):
        return self.tokens[(self.stream, self.local)]

    def get_positions(self):
        return {self.local: self.tokens[(self.stream, self.local)]}


class StubStore:
    """The datastore surface of the streams: id generators and the update queries."""

    def __init__(self, tokens, local):
        self._tokens, self._local = tokens, local

    def get_cache_stream_token_for_writer(self, instance_name):
        return self._tokens[("caches", instance_name)]

    async def get_all_updated_caches(self, *args):
        return await _query("caches", *args)

    async def get_all_updated_receipts(self, *args):
        return await _query("receipts", *args)

    async def get_all_new_device_messages(self, *args):
        return await _query("to_device", *args)

    async def get_all_push_rule_updates(self, *args):
        return await _query("push_rules", *args)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name.endswith("_id_gen"):
            # The written streams' generators read their tokens; any other stream's stays at
            # FIRST for ever.
            return IdGen(self._tokens, ID_GENS.get(name, name), self._local)
        if name.startswith("get_") or name.startswith("insert_"):
            # Update queries of the unwritten streams (never called: their tokens never move)
            # and side effects such as insert_client_ip (whose result nobody reads).
            async def nothing(instance_name=None, from_token=0, to_token=0, *rest, **kwargs):
                return [], to_token, False

            return nothing
        return Dummy("store." + name)


class StubTypingHandler:
    def __init__(self, tokens):
        self._tokens = tokens

    def get_current_token(self):
        return self._tokens[("typing", "master")]

    async def get_all_typing_updates(self, *args):
        return await _query("typing", *args)

    __getattr__ = harness.dummy_attributes("typing.")


class _Presence:
    """The presence handler's replication surface, mixed into Synapse's PresenceHandler class
    (its constructor not run) because the presence stream asserts the type."""

    def __init__(self):
        pass

    async def update_external_syncs_row(self, instance_id, user_id, device_id, is_syncing, ms):
        emit("user_sync_handled", instance_id=instance_id, user_id=user_id, device_id=device_id,
             is_syncing=is_syncing, last_sync_ms=ms)

    async def update_external_syncs_clear(self, instance_id):
        pass

    def get_currently_syncing_users_for_replication(self):
        return []

    async def get_all_presence_updates(self, instance_name, from_token, to_token, limit):
        return [], to_token, False

    def get_federation_queue(self):
        return _FederationQueue()

    __getattr__ = harness.dummy_attributes("presence.")


class _FederationQueue:
    def get_current_token(self, instance_name):
        return FIRST

    async def get_replication_rows(self, instance_name, frm, to, limit):
        return [], to, False


def make_presence_handler():
    from synapse.handlers.presence import PresenceHandler

    return type("StubPresenceHandler", (_Presence, PresenceHandler), {})()


class StubNotifier:
    """The notifier as replication uses it: the streamer's poke callback, REMOTE_SERVER_UP."""

    def __init__(self):
        self.replication_callbacks = []

    def add_replication_callback(self, cb):
        self.replication_callbacks.append(cb)

    def notify_replication(self):
        for cb in self.replication_callbacks:
            cb()

    on_new_replication_data = notify_replication

    def notify_remote_server_up(self, server):
        emit("remote_server_up", server=server)

    __getattr__ = harness.dummy_attributes("notifier.")


class RecordingDataHandler:
    """The replication data handler: what Synapse's ReplicationDataHandler is given after the
    command handler has parsed, ordered and filtered. Records, and advances the tokens as a
    slaved store's process_replication_rows would."""

    def __init__(self, tokens):
        self._tokens = tokens

    async def on_rdata(self, stream_name, instance_name, token, rows):
        self._tokens.advance(stream_name, instance_name, token)
        emit("rdata", stream=stream_name, instance=instance_name, token=token,
             rows=[harness.row_to_json(r) for r in rows])

    async def on_position(self, stream_name, instance_name, token):
        self._tokens.advance(stream_name, instance_name, token)
        emit("position", stream=stream_name, instance=instance_name, token=token)

    __getattr__ = harness.dummy_attributes("data_handler.")


class StubHomeServer(harness.HomeServerBase):
    """The homeserver object handed to Synapse's replication classes (1.163 names); what it
    shares with the TCP harness's homeserver comes from harness.HomeServerBase."""

    def __init__(self, config, instance_name):
        from synapse.util.clock import Clock

        self.config = config
        self.hostname = config.server_name
        self._instance_name = instance_name
        self._instance_id = "i" + harness.os.urandom(4).hex()
        self.tokens = Tokens()
        self._store = StubStore(self.tokens, instance_name)
        self._reactor = harness.TapReactor(harness.Tap())
        self._clock = Clock(reactor, server_name=self.hostname)
        self._typing = StubTypingHandler(self.tokens)
        self._presence = make_presence_handler()
        self._notifier = StubNotifier()
        self._data_handler = RecordingDataHandler(self.tokens)
        self._singletons = {}

    def run_as_background_process(self, desc, func, *args, **kwargs):
        from synapse.metrics.background_process_metrics import run_as_background_process

        return run_as_background_process(desc, self.hostname, func, *args, **kwargs)

    def get_datastores(self):
        return harness._Datastores(self._store)

    def get_replication_data_handler(self):
        return self._data_handler

    def get_replication_command_handler(self):
        from synapse.replication.tcp.handler import ReplicationCommandHandler

        return self._single("command_handler", lambda: ReplicationCommandHandler(self))

    def get_outbound_redis_connection(self):
        # What HomeServer.get_outbound_redis_connection does (TCP, no TLS), plus the recorder.
        from synapse.replication.tcp.redis import lazyConnection

        def make():
            conn = lazyConnection(hs=self, host=self.config.redis_host, port=self.config.redis_port)
            record_publishes(conn)
            return conn

        return self._single("outbound_redis", make)


class Writers:
    """``config.worker.writers``: the main process writes every stream."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return ["master"]


_publish_seq = [0]


def record_publishes(conn):
    """Prints every PUBLISH on the outbound connection (in call order, which is the order
    txredisapi writes them) and its reply. The bytes sent are Synapse's and txredisapi's."""
    publish = conn.publish

    def recording_publish(channel, message):
        _publish_seq[0] += 1
        seq = _publish_seq[0]
        line = message.decode("utf-8") if isinstance(message, bytes) else message
        d = publish(channel, message)

        def done(reply):
            emit("published", seq=seq, channel=channel, line=line, reply=reply)
            return reply

        def failed(failure):
            emit("publish_failed", seq=seq, channel=channel, line=line,
                 error=failure.getErrorMessage())
            return failure

        d.addCallbacks(done, failed)
        return d

    conn.publish = recording_publish


def record_commands(handler):
    """Wraps the handler's on_<NAME> methods on the instance: RedisSubscriber looks them up by
    name for every parsed message, so each command reaching the handler is printed (as the
    line Synapse's own serialiser makes of it) before the handler runs."""
    for attr_name in dir(type(handler)):
        if not attr_name.startswith("on_") or not attr_name[3:].isupper():
            continue
        method = getattr(handler, attr_name)

        def recording(conn, cmd, _method=method):
            # pub_seq: PUBLISHes made so far, so a driver can tell what was sent after this.
            emit("command", name=cmd.NAME, line="%s %s" % (cmd.NAME, cmd.to_line()),
                 pub_seq=_publish_seq[0])
            return _method(conn, cmd)

        setattr(handler, attr_name, recording)

    new_connection = handler.new_connection

    def on_new_connection(conn):
        # RedisSubscriber calls this once its SUBSCRIBE is confirmed, before REPLICATE.
        emit("subscribed")
        return new_connection(conn)

    handler.new_connection = on_new_connection


class Stdin(basic.LineReceiver):
    delimiter = b"\n"

    def __init__(self, node):
        self.node = node

    def lineReceived(self, line):
        words = line.decode().split()
        if not words:
            return
        try:
            self.node.command(words)
        except Exception as e:  # a driver mistake must be visible, not kill the node
            emit("error", message="stdin %r: %r" % (line, e))


class Node:
    def __init__(self, args, hs):
        self.args, self.hs = args, hs
        self.handler = hs.get_replication_command_handler()
        self.streams = MASTER_STREAMS if args.role == "master" else WORKER_STREAMS
        self.user_ip_count = 0
        self.connected = False

    def connect(self):
        if self.connected:
            raise ValueError("already connected")
        self.connected = True
        self.handler.start_replication(self.hs)

    def command(self, words):
        name = self.args.name
        if words[0] == "write":
            for _ in range(int(words[1])):
                for stream in self.streams:
                    self.hs.tokens[(stream, name)] += 1
            written = {s: self.hs.tokens[(s, name)] for s in self.streams}
            # What a write does in Synapse: the notifier pokes the replication streamer.
            self.hs.get_notifier().notify_replication()
            emit("written", tokens=written)
        elif words[0] == "user_ip":
            self.user_ip_count += 1
            n = self.user_ip_count
            self.handler.send_user_ip("@%s-ip%d:%s" % (name, n, harness.SERVER_NAME), "tok%d" % n,
                                      "127.0.0.%d" % n, "ua/%d \u00e9" % n, "DEV%d" % n, 1000 * n)
            emit("sent", what="user_ip")
        elif words[0] == "user_sync":
            self.handler.send_user_sync(self.hs.get_instance_id(),
                                        "@%s-sync:%s" % (name, harness.SERVER_NAME), "DEV", True,
                                        123456)
            emit("sent", what="user_sync")
        elif words[0] == "remote_server_up":
            self.handler.send_remote_server_up(words[1])
            emit("sent", what="remote_server_up")
        elif words[0] == "connect":
            self.connect()
        elif words[0] == "quit":
            emit("stopping", reason="quit")
            reactor.stop()
        else:
            emit("error", message="unknown stdin command %r" % words[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=["master", "worker"], required=True)
    ap.add_argument("--name", required=True, help="instance name (the master is `master`)")
    ap.add_argument("--redis", required=True, help="127.0.0.1:PORT of a Redis (or RESP) server")
    ap.add_argument("--server-name", default="example.com")
    ap.add_argument("--release", default=None, help="expected synapse version (default: any)")
    ap.add_argument("--no-hiredis", action="store_true", help="txredisapi's pure-Python parser")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--log-file", default=None)
    ap.add_argument("--connect-on-stdin", action="store_true",
                    help="connect to Redis on the stdin command `connect`, not at start")
    args = ap.parse_args()
    if args.role == "master" and args.name != "master":
        ap.error("the main process's instance name is `master`")
    host, _, port = args.redis.rpartition(":")
    if host not in ("127.0.0.1", "::1", "localhost"):
        ap.error("only loopback addresses")
    args.release = args.release or harness.synapse.__version__
    harness.start_process(args)

    config = StubConfig(
        server_name=args.server_name,
        worker_app=None if args.role == "master" else "synapse.app.generic_worker",
        worker_name=None if args.role == "master" else args.name,
        instance_name=args.name,
        run_background_tasks=args.role == "master",
        send_federation=args.role == "master",
        redis_enabled=True,
        redis_host=host,
        redis_port=int(port),
        redis_path=None,
        redis_use_tls=False,
        redis_dbid=None,
        redis_username=None,
        redis_password=None,
        writers=Writers(),
        instance_map={},
        use_presence=True,
    )
    hs = StubHomeServer(config, args.name)
    handler = hs.get_replication_command_handler()
    record_commands(handler)
    node = Node(args, hs)
    emit("started", role=args.role, name=args.name, release=harness.synapse.__version__,
         txredisapi=txredisapi.__version__,
         parser=txredisapi.RedisProtocol.__name__,
         hiredis=txredisapi.hiredis is not None,
         instance_id=hs.get_instance_id(),
         replicates=[s.NAME for s in handler.get_streams_to_replicate()],
         channels=[args.server_name + "/" + c for c in handler._channels_to_subscribe_to]
         + [args.server_name])
    if not args.connect_on_stdin:
        node.connect()
    stdio.StandardIO(Stdin(node))
    reactor.run()


if __name__ == "__main__":
    main()
