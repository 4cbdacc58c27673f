"""What the master and worker processes share: JSON output, the wire tap, the stub homeserver.

Nothing here replaces or edits Synapse's replication code. The pieces are:

* ``emit``: one JSON object per line on stdout, flushed, so that a driving test can read events
  as they happen.
* ``LogToJson``: a logging handler on the ``synapse`` logger. A record carrying an exception
  (``logger.exception`` and anything logged with ``exc_info``) becomes ``{"event": "exception"}``;
  other records at WARNING and above become ``{"event": "log"}``. From 1.13 a worker that
  cannot handle a row only logs it, so these lines are the only evidence of a bad row.
* ``TapReactor``: the homeserver's reactor. It wraps every factory given to ``listenTCP`` /
  ``connectTCP`` in a ``policies.WrappingFactory`` that reports each complete line in either
  direction and each connect/disconnect. The bytes pass through untouched.
* ``Db``: the in-memory stand-in for the database behind the streams. Row contents are a pure
  function of (stream, token), so a worker's "shared database" (Synapse workers read the
  master's database for the streams that live there) is the same function, computed locally.
* ``StubStore``, ``StubHomeServer``: the homeserver around the replication code, answering the
  calls each release's streams, streamer and command handler make (names and signatures differ
  by release; see ``FAMILY``).
"""

import json
import logging
import os
import signal
import sys
import time

import compat  # noqa: F401  (must precede any synapse import)

import attr
import synapse
from twisted.internet import reactor
from twisted.protocols import policies

VERSION = tuple(int(x) for x in synapse.__version__.split(".")[:3])
# The release families whose replication code differs in the calls it makes on the homeserver
# (checked against 1.12.4, 1.13.0, 1.22.1 and 1.66.0; releases in between are untested).
if VERSION < (1, 13, 0):
    FAMILY = 112
elif VERSION < (1, 22, 0):
    FAMILY = 113
elif VERSION < (1, 60, 0):
    FAMILY = 122
else:
    FAMILY = 166

SERVER_NAME = "example.com"


def emit(event, **fields):
    """Writes one JSON line to stdout."""
    fields = dict({"event": event, "t": round(time.time(), 3)}, **fields)
    sys.stdout.write(json.dumps(fields, default=repr, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class LogToJson(logging.Handler):
    """Turns Synapse's warnings, errors and logged exceptions into JSON lines."""

    def emit(self, record):
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string must not hide the record
            msg = repr(record.msg)
        if record.exc_info:
            exc = record.exc_info[1]
            emit(
                "exception",
                logger=record.name,
                message=msg,
                exception=repr(exc),
                traceback=logging.Formatter().formatException(record.exc_info),
            )
        elif record.levelno >= logging.WARNING:
            emit("log", level=record.levelname, logger=record.name, message=msg)


def setup_logging(debug_file=None):
    """Routes the ``synapse`` loggers to JSON lines (and, optionally, everything to a file)."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler = LogToJson()
    handler.setLevel(logging.INFO)
    logging.getLogger("synapse").addHandler(handler)
    if debug_file:
        fh = logging.FileHandler(debug_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(fh)
    # Twisted reports unhandled errors in Deferreds through its own log; route them too.
    from twisted.python import log as twlog

    def observer(event):
        if event.get("isError"):
            failure = event.get("failure")
            emit(
                "exception",
                logger="twisted",
                message=str(event.get("why") or ""),
                exception=repr(failure.value) if failure else "",
                traceback=failure.getTraceback() if failure else "",
            )

    twlog.addObserver(observer)


def stop_after(seconds, code_fn=lambda: 0):
    """Stops the reactor after `seconds` (the hard bound of every run) and on SIGTERM/SIGINT."""

    def stop(reason):
        emit("stopping", reason=reason)
        if reactor.running:
            reactor.stop()

    if seconds:
        reactor.callLater(seconds, stop, "time limit")
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(stop, "SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: reactor.callFromThread(stop, "SIGINT"))


def start_process(args):
    """The common start of a master or worker process: the server name, a check that this
    Python has the release asked for (exit 2 if not), logging, the time limit, and dying with
    the parent."""
    global SERVER_NAME
    SERVER_NAME = args.server_name
    if synapse.__version__ != args.release:
        emit("error", message="this python has synapse %s, not %s" % (synapse.__version__, args.release))
        sys.exit(2)
    setup_logging(args.log_file)
    stop_after(args.seconds)
    die_with_parent()


def die_with_parent():
    """Exits when the parent goes away (stdin closed is not used: stdin may carry commands)."""
    parent = os.getppid()

    def check():
        if os.getppid() != parent:
            emit("stopping", reason="parent exited")
            reactor.stop()

    from twisted.internet import task

    task.LoopingCall(check).start(1.0, now=False)


# --- the wire tap -----------------------------------------------------------------------------


class _TapProtocol(policies.ProtocolWrapper):
    """Reports complete lines each way; passes every byte through unchanged."""

    def __init__(self, factory, wrapped):
        super().__init__(factory, wrapped)
        self._in = b""
        self._out = b""
        self.conn = None

    def makeConnection(self, transport):
        self.factory.tap.counter += 1
        self.conn = self.factory.tap.counter
        peer = transport.getPeer()
        self.factory.tap.on_connect(self.conn, "%s:%s" % (peer.host, peer.port))
        super().makeConnection(transport)

    def dataReceived(self, data):
        self._in += data
        *lines, self._in = self._in.split(b"\n")
        for line in lines:
            self.factory.tap.on_line(self.conn, "in", line.decode("utf-8", "replace"))
        super().dataReceived(data)

    def write(self, data):
        self._out += data
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            self.factory.tap.on_line(self.conn, "out", line.decode("utf-8", "replace"))
        super().write(data)

    def writeSequence(self, data):
        self.write(b"".join(data))

    def connectionLost(self, reason):
        self.factory.tap.on_disconnect(self.conn, reason.getErrorMessage())
        super().connectionLost(reason)


class _TapFactory(policies.WrappingFactory):
    protocol = _TapProtocol

    def __init__(self, wrapped, tap):
        super().__init__(wrapped)
        self.tap = tap

    # ReconnectingClientFactory keeps its own state; forward what WrappingFactory does not.
    def clientConnectionLost(self, connector, reason):
        self.wrappedFactory.clientConnectionLost(connector, reason)

    def clientConnectionFailed(self, connector, reason):
        self.wrappedFactory.clientConnectionFailed(connector, reason)


class Tap:
    """Callbacks for the tap; the master and worker subclass it to decide what to print."""

    def __init__(self):
        self.counter = 0

    def on_connect(self, conn, peer):
        emit("connected", conn=conn, peer=peer)

    def on_disconnect(self, conn, reason):
        emit("disconnected", conn=conn, reason=reason)

    def on_line(self, conn, direction, line):
        pass


class TapReactor:
    """The global reactor, except that TCP factories get wrapped by the tap."""

    def __init__(self, tap):
        self._tap = tap

    def listenTCP(self, port, factory, backlog=50, interface=""):
        return reactor.listenTCP(port, _TapFactory(factory, self._tap), backlog, interface)

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        return reactor.connectTCP(host, port, _TapFactory(factory, self._tap), timeout, bindAddress)

    def __getattr__(self, name):
        return getattr(reactor, name)


# --- permissive stand-ins ---------------------------------------------------------------------


class Dummy:
    """Anything the replication code asks of a homeserver part the harness does not model.

    Calls return another Dummy, which can be awaited (giving None), iterated (empty) and is
    false. Only used for side effects the replication protocol does not depend on (metrics,
    presence bookkeeping, federation sending, notifying local listeners).
    """

    def __init__(self, name="dummy"):
        self._name = name

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Dummy(self._name + "." + name)

    def __call__(self, *args, **kwargs):
        return Dummy(self._name + "()")

    def __await__(self):
        async def value():
            return Dummy(self._name + " awaited")

        return value().__await__()

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False

    def __len__(self):
        return 0


def dummy_attributes(prefix):
    """A ``__getattr__`` for the stubs below: whatever Synapse asks of a stub that it does not
    define is a Dummy named ``prefix + name``, while dunder lookups (copy, pickle and repr
    probes) still raise AttributeError."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Dummy(prefix + name)

    return __getattr__


class StubConfig:
    """Flat configuration; section objects (``config.worker``, ``config.redis``...) are itself.

    Unknown options read as None (Synapse's "not configured"), which keeps Redis, metrics,
    torture tests, instance maps, etc. off.
    """

    def __init__(self, **values):
        self.__dict__.update(values)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        # section objects of 1.2x-1.66 config (hs.config.worker.worker_app, hs.config.redis...)
        if name in ("worker", "redis", "server", "federation", "metrics", "api", "ratelimiting",
                    "registration", "experimental", "caches", "database", "jwt", "tracing"):
            return self
        return None


class Writers:
    """``config.worker.writers``: the main process writes every stream."""

    # 1.22 compares `writers.typing == instance_name`, 1.66 tests `instance_name in
    # writers.typing`; a plain string answers both.
    typing = "master"

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return ["master"]


# --- the in-memory database -------------------------------------------------------------------

# Streams and the id generator behind each. Streams sharing a generator take turns: token t of a
# generator with owners L belongs to L[(t - FIRST - 1) % len(L)], so both sides can tell which
# stream a token was written to. 1.12 user_signature rows are not written: its row type is
# namedtuple(..., ("user_id")) (a string, so seven fields), which no row of one field fits.
GENERATORS = {
    "events": ["events"],
    "backfill": ["backfill"],
    "presence": ["presence"],
    "typing": ["typing"],
    "receipts": ["receipts"],
    "push_rules": ["push_rules"],
    "pushers": ["pushers"],
    "caches": ["caches"],
    "public_rooms": ["public_rooms"],
    "device": ["device_lists"],
    "to_device": ["to_device"],
    "account_data": ["tag_account_data", "account_data"],
    "groups": ["groups"],
    "presence_federation": ["presence_federation"],
}
GENERATOR_OF = {s: g for g, ss in GENERATORS.items() for s in ss}
GENERATOR_OF["user_signature"] = "device"
# Every generator starts here ("an empty database"); the first row gets FIRST + 1.
FIRST = 1


def owner(gen, token):
    owners = GENERATORS[gen]
    return owners[(token - FIRST - 1) % len(owners)]


def room(t):
    """Room ids; every fifth one non-ASCII, so JSON escaping (Synapse writes ``\\u00fc``) is
    exercised end to end."""
    if t % 5 == 0:
        return "!\u00fcn\u00efc\u00f8d\u00e9-%d:%s" % (t, SERVER_NAME)
    return "!room%d:%s" % (t % 3, SERVER_NAME)


def db_fields(stream, token):
    """The database row for `stream` at `token`, without the token (as the stream's query
    functions return it, before any per-release conversion). For `events` a list of (kind,
    fields): every token has an `ev` row, even tokens also a `state` row (same token, so one
    batch on the wire)."""
    t = token
    if stream == "events":
        ev = ["$ev%d:%s" % (t, SERVER_NAME), room(t),
              "m.room.message" if t % 2 else "m.room.member", None if t % 2 else "@u%d:%s" % (t, SERVER_NAME),
              None, None]
        # PROTOCOL 8.2: `membership` and `rejected` from 1.23, `outlier` from 1.64
        if VERSION >= (1, 23, 0):
            ev += [None if t % 2 else "join", False]
        if VERSION >= (1, 64, 0):
            ev += [False]
        out = [("ev", ev)]
        if t % 2 == 0:
            out.append(("state", [room(t), "m.room.member",
                                  "@u%d:%s" % (t, SERVER_NAME), "$ev%d:%s" % (t, SERVER_NAME)]))
        return out
    if stream == "backfill":
        return ["$bf%d:%s" % (t, SERVER_NAME), "!room1:%s" % SERVER_NAME, "m.room.message",
                None, None, None]
    if stream == "presence":
        row = ["@u%d:%s" % (t, SERVER_NAME), "online", 1000 * t, 1000 * t, 1000 * t,
               "status %d" % t, True]
        return row
    if stream == "typing":
        return [room(t), ["@u%d:%s" % (t, SERVER_NAME)]]
    if stream == "receipts":
        return ["!room1:%s" % SERVER_NAME, "m.read", "@u%d:%s" % (t, SERVER_NAME),
                "$ev%d:%s" % (t, SERVER_NAME), {"ts": 1000 * t}]
    if stream == "push_rules":
        return ["@u%d:%s" % (t, SERVER_NAME)]
    if stream == "pushers":
        return ["@u%d:%s" % (t, SERVER_NAME), "m.http", "key%d" % t, t % 2 == 0]
    if stream == "caches":
        return ["get_user_by_id", ["@u%d:%s" % (t, SERVER_NAME)], 1000 * t]
    if stream == "public_rooms":
        return ["!room%d:%s" % (t, SERVER_NAME), "public", None, None]
    if stream == "device_lists":
        if FAMILY == 112:
            return ["@u%d:%s" % (t, SERVER_NAME), "remote%d.example.org" % t]
        return ["@u%d:%s" % (t, SERVER_NAME)]
    if stream == "to_device":
        return ["@u%d:%s" % (t, SERVER_NAME)]
    if stream == "tag_account_data":
        return ["@u%d:%s" % (t, SERVER_NAME), "!room1:%s" % SERVER_NAME, {"tags": {"u.x": {}}}]
    if stream == "account_data":
        # even tokens: room account data, odd: global (room_id None)
        return ["@u%d:%s" % (t, SERVER_NAME), None if t % 2 else "!room1:%s" % SERVER_NAME,
                "m.test.%d" % t]
    if stream == "groups":
        return ["+g%d:%s" % (t, SERVER_NAME), "@u%d:%s" % (t, SERVER_NAME), "membership",
                {"membership": "join"}]
    if stream == "presence_federation":
        return ["remote%d.example.org" % t, "@u%d:%s" % (t, SERVER_NAME)]
    raise KeyError(stream)


def wire_rows(stream, token):
    """The rows as they appear on the wire / reach the worker's handler (JSON values)."""
    if stream == "events":
        return [[kind, fields] for kind, fields in db_fields(stream, token)]
    return [db_fields(stream, token)]


class Db:
    """Current token per generator; rows are ``db_fields``. The master advances generators when
    it writes; a worker's copy only answers queries (its "shared database")."""

    def __init__(self):
        self.current = {g: FIRST for g in GENERATORS}

    def write(self, stream):
        gen = GENERATOR_OF[stream]
        assert owner(gen, self.current[gen] + 1) == stream, (stream, self.current[gen])
        self.current[gen] += 1
        return self.current[gen]

    def rows(self, stream, from_token, to_token, limit=None):
        """[(token, fields)] for tokens in (from_token, to_token] written to `stream`."""
        gen = GENERATOR_OF[stream]
        out = []
        for t in range(int(from_token) + 1, int(to_token) + 1):
            if t <= FIRST or owner(gen, t) != stream or stream == "user_signature":
                continue
            out.append((t, db_fields(stream, t)))
            if limit is not None and len(out) >= limit:
                break
        return out


class _Event:
    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.internal_metadata = Dummy("event.internal_metadata")

    def is_state(self):
        return self.state_key is not None

    __getattr__ = dummy_attributes("event.")


class WorkerPositions:
    """A worker's positions, per stream; read per id generator (what the store's token
    functions are keyed by) as the lowest position among the streams sharing it, so that a
    worker behind on either of two streams sharing a generator catches both up."""

    def __init__(self):
        self.pos = {s: FIRST for s in GENERATOR_OF}

    def __getitem__(self, gen):
        return min(p for s, p in self.pos.items() if GENERATOR_OF[s] == gen)

    def advance(self, stream, token):
        if stream in self.pos and isinstance(token, int) and token > self.pos[stream]:
            self.pos[stream] = token


def _limited(rows, to_token, limit):
    """The (updates, upto_token, limited) triple of 1.13+ update functions."""
    if limit is not None and len(rows) >= limit:
        return rows, rows[-1][0], True
    return rows, to_token, False


class StubStore:
    """The datastore methods the streams call, per release family.

    Families 112/113 call query functions as ``(from, to[, limit])`` returning database rows
    ``(token, *fields)``; from 122 they take ``(instance_name, from, to, limit)`` and return
    ``(updates, upto_token, limited)`` with ``updates = [(token, fields)]``. Tokens come from
    `tokens` (a dict gen -> current), which is the Db's on the master and the worker's own
    positions on a worker.
    """

    def __init__(self, db, tokens):
        self.db = db
        self.tokens = tokens
        store = self

        class IdGen:
            def __init__(self, gen, sign=1):
                self.gen, self.sign = gen, sign

            def get_current_token_for_writer(self, instance_name):
                return self.sign * store.tokens[self.gen]

            def get_current_token(self):
                return self.sign * store.tokens[self.gen]

            def get_positions(self):
                return {"master": self.sign * store.tokens[self.gen]}

        self._stream_id_gen = IdGen("events")
        self._backfill_id_gen = IdGen("backfill", -1)
        self._cache_id_gen = IdGen("caches")

    # tokens
    def _tok(gen):
        return lambda self, *args: self.tokens[gen]

    get_current_events_token = _tok("events")
    get_current_backfill_token = _tok("backfill")
    get_current_presence_token = _tok("presence")
    get_max_receipt_stream_id = _tok("receipts")
    get_max_push_rules_stream_id = _tok("push_rules")
    get_pushers_stream_token = _tok("pushers")
    get_cache_stream_token = _tok("caches")
    get_cache_stream_token_for_writer = _tok("caches")
    get_current_public_room_stream_id = _tok("public_rooms")
    get_device_stream_token = _tok("device")
    get_to_device_stream_token = _tok("to_device")
    get_max_account_data_stream_id = _tok("account_data")
    get_group_stream_token = _tok("groups")

    def get_push_rules_stream_token(self):
        return self.tokens["push_rules"], self.tokens["events"]

    # queries
    def _query(stream):
        async def query(self, *args, **kwargs):
            args = args + tuple(kwargs.values())  # 1.12 passes limit by keyword
            if args and isinstance(args[0], str):  # 1.22+: (instance, from, to, limit)
                _, frm, to, limit = args
                rows = [(t, tuple(f)) for t, f in self.db.rows(stream, frm, to, limit)]
                return _limited(rows, to, limit)
            frm, to = args[0], args[1]
            limit = args[2] if len(args) > 2 else None
            return [(t, *f) for t, f in self.db.rows(stream, frm, to, limit)]

        return query

    get_all_new_backfill_event_rows = _query("backfill")
    get_all_updated_receipts = _query("receipts")
    get_all_updated_pushers_rows = _query("pushers")
    get_all_updated_caches = _query("caches")
    get_all_new_public_rooms = _query("public_rooms")
    get_all_device_list_changes_for_remotes = _query("device_lists")
    get_all_user_signature_changes_for_remotes = _query("user_signature")
    get_all_new_device_messages = _query("to_device")
    get_all_updated_tags = _query("tag_account_data")
    get_all_groups_changes = _query("groups")

    async def get_all_push_rule_updates(self, *args, **kwargs):
        args = args + tuple(kwargs.values())
        if args and isinstance(args[0], str):
            _, frm, to, limit = args
            rows = [(t, tuple(f)) for t, f in self.db.rows("push_rules", frm, to, limit)]
            return _limited(rows, to, limit)
        frm, to, limit = args
        # 1.12/1.13 take row[0] (token) and row[2] (user_id) of push_rules_stream rows
        return [(t, 0, f[0]) for t, f in self.db.rows("push_rules", frm, to, limit)]

    async def get_all_updated_account_data(self, last_global, last_room, current, limit):
        rows = self.db.rows("account_data", last_room, current, limit)
        glob = [(t, f[0], f[2]) for t, f in rows if f[1] is None]
        room = [(t, f[0], f[1], f[2]) for t, f in rows if f[1] is not None]
        return glob, room

    async def get_updated_global_account_data(self, frm, to, limit):
        rows = self.db.rows("account_data", frm, to)
        return [(t, f[0], f[2]) for t, f in rows if f[1] is None][:limit]

    async def get_updated_room_account_data(self, frm, to, limit):
        rows = self.db.rows("account_data", frm, to)
        return [(t, f[0], f[1], f[2]) for t, f in rows if f[1] is not None][:limit]

    async def get_all_new_forward_event_rows(self, *args, **kwargs):
        args = args + tuple(kwargs.values())
        if args and isinstance(args[0], str):
            args = args[1:]
        frm, to, limit = args
        out = []
        for t, parts in self.db.rows("events", frm, to):
            out.extend((t, *fields) for kind, fields in parts if kind == "ev")
            if len(out) >= limit:
                break
        return out[:limit]

    async def get_all_updated_current_state_deltas(self, *args, **kwargs):
        args = args + tuple(kwargs.values())
        if args and isinstance(args[0], str):
            args = args[1:]
        frm, to, limit = args
        out = []
        for t, parts in self.db.rows("events", frm, to):
            out.extend((t, *fields) for kind, fields in parts if kind == "state")
        if FAMILY == 112:
            return out[:limit]
        if len(out) >= limit:
            return out[:limit], out[limit - 1][0], True
        return out, to, False

    async def get_ex_outlier_stream_rows(self, *args):
        return []

    async def get_event(self, event_id, *args, **kwargs):
        """A worker looks up each new event (1.22) to notify its listeners."""
        t = int(event_id[3:].split(":")[0])
        ev = dict(db_fields("events", t))["ev"]
        return _Event(event_id=ev[0], room_id=ev[1], type=ev[2], state_key=ev[3],
                      rejected_reason=None, sender="@u%d:%s" % (t, SERVER_NAME))

    # Worker side: a slaved store advances its positions from what replication delivers.
    def process_replication_rows(self, stream_name, *args):
        self.tokens.advance(stream_name, args[-2])

    __getattr__ = dummy_attributes("store.")


class StubTypingHandler:
    """The typing handler's replication surface (typing lives in memory on its writer)."""

    def __init__(self, db, tokens):
        self.db, self.tokens = db, tokens

    def get_current_token(self):
        return self.tokens["typing"]

    async def get_all_typing_updates(self, *args, **kwargs):
        args = args + tuple(kwargs.values())
        if args and isinstance(args[0], str):
            _, frm, to, limit = args
            rows = [(t, tuple(f)) for t, f in self.db.rows("typing", frm, to, limit)]
            return _limited(rows, to, limit)
        frm, to = args[0], args[1]
        return [(t, *f) for t, f in self.db.rows("typing", frm, to)]

    def process_replication_rows(self, token, rows):
        self.tokens.advance("typing", token)

    __getattr__ = dummy_attributes("typing.")


class StubPresenceHandler:
    """The presence handler's replication surface. On 1.66 it is mixed into Synapse's
    PresenceHandler class (without running its constructor) because the presence stream asserts
    ``isinstance(handler, PresenceHandler)``; every method replication calls is defined here."""

    def __init__(self, db, tokens):
        self.db = db
        self.tokens = tokens

    def get_federation_queue(self):
        return _FederationQueue(self.db, self.tokens)

    async def update_external_syncs_row(self, *args):
        pass

    async def update_external_syncs_clear(self, *args):
        pass

    async def process_replication_rows(self, *args):
        pass

    async def get_all_presence_updates(self, *args, **kwargs):
        args = args + tuple(kwargs.values())
        if args and isinstance(args[0], str):
            _, frm, to, limit = args
            rows = [(t, tuple(f)) for t, f in self.db.rows("presence", frm, to, limit)]
            return _limited(rows, to, limit)
        frm, to = args[0], args[1]
        return [(t, *f) for t, f in self.db.rows("presence", frm, to)]

    def get_currently_syncing_users_for_replication(self):
        return []

    def get_currently_syncing_users(self):
        return []

    __getattr__ = dummy_attributes("presence.")


class _FederationQueue:
    """1.66's presence federation queue (the presence_federation stream)."""

    def __init__(self, db, tokens):
        self.db, self.tokens = db, tokens

    def get_current_token(self, instance_name):
        return self.tokens["presence_federation"]

    async def get_replication_rows(self, instance_name, frm, to, limit):
        rows = [(t, tuple(f)) for t, f in self.db.rows("presence_federation", frm, to, limit)]
        return _limited(rows, to, limit)


def make_presence_handler(db, tokens):
    if FAMILY >= 166:
        from synapse.handlers.presence import PresenceHandler

        cls = type("StubPresenceHandler", (StubPresenceHandler, PresenceHandler), {})
        return cls(db, tokens)
    return StubPresenceHandler(db, tokens)


class StubFederationSender:
    """A master that sends federation itself (send_federation: true) has a FederationSender,
    whose replication surface is an always-empty stream at token 0."""

    def get_current_token(self, *args):
        return 0

    async def get_replication_rows(self, *args):
        if args and isinstance(args[0], str):
            return [], args[2], False
        return []

    __getattr__ = dummy_attributes("federation_sender.")


class StubNotifier:
    """Synapse's Notifier as far as replication uses it: replication callbacks (the streamer
    registers one; writing a row calls them) and remote-server-up callbacks (1.12)."""

    def __init__(self):
        self.replication_callbacks = []
        self.remote_server_up_callbacks = []

    def add_replication_callback(self, cb):
        self.replication_callbacks.append(cb)

    def add_remote_server_up_callback(self, cb):
        self.remote_server_up_callbacks.append(cb)

    def on_new_replication_data(self):
        for cb in self.replication_callbacks:
            cb()

    notify_replication = on_new_replication_data

    def notify_remote_server_up(self, server):
        for cb in self.remote_server_up_callbacks:
            cb(server)

    __getattr__ = dummy_attributes("notifier.")


class HomeServerBase:
    """What every stub homeserver answers the same way. A subclass sets ``_singletons`` ({}),
    ``_reactor``, ``_clock``, ``_instance_name``, ``_instance_id``, ``_typing``, ``_presence``
    and ``_notifier``; any other ``get_*`` it does not define gives a Dummy."""

    def _single(self, name, make):
        if name not in self._singletons:
            self._singletons[name] = make()
        return self._singletons[name]

    def get_reactor(self):
        return self._reactor

    def get_clock(self):
        return self._clock

    def get_instance_name(self):
        return self._instance_name

    def get_instance_id(self):
        return self._instance_id

    def get_typing_handler(self):
        return self._typing

    get_typing_writer_handler = get_typing_handler

    def get_presence_handler(self):
        return self._presence

    def get_notifier(self):
        return self._notifier

    get_replication_notifier = get_notifier

    def should_send_federation(self):
        return False

    def get_replication_streamer(self):
        from synapse.replication.tcp.resource import ReplicationStreamer

        return self._single("streamer", lambda: ReplicationStreamer(self))

    def __getattr__(self, name):
        if name.startswith("get_"):
            return lambda *a, **k: Dummy("hs." + name + "()")
        raise AttributeError(name)


class StubHomeServer(HomeServerBase):
    """The homeserver object handed to Synapse's replication classes."""

    def __init__(self, config, tap, db, tokens, instance_name):
        from synapse.util import Clock

        self.config = config
        self.hostname = config.server_name
        self._reactor = TapReactor(tap)
        self._clock = Clock(reactor)
        self._instance_name = instance_name
        self._instance_id = "i" + os.urandom(3).hex()[:4]
        self.db = db
        self.tokens = tokens
        self._store = StubStore(db, tokens)
        self._typing = StubTypingHandler(db, tokens)
        self._presence = make_presence_handler(db, tokens)
        self._notifier = StubNotifier()
        self._singletons = {}
        self.version_string = "Synapse/" + synapse.__version__

    def get_datastore(self):
        return self._store

    get_datastores = None  # 1.66 uses hs.get_datastores().main; set in __init__ below

    def get_federation_sender(self):
        return self._single("federation_sender", StubFederationSender)

    def get_tcp_replication(self):
        from synapse.replication.tcp.handler import ReplicationCommandHandler

        return self._single("tcp", lambda: ReplicationCommandHandler(self))

    def get_replication_command_handler(self):
        return self.get_tcp_replication()

    def get_replication_streams(self):
        from synapse.replication.tcp.streams import STREAMS_MAP

        return self._single("streams", lambda: {s.NAME: s(self) for s in STREAMS_MAP.values()})


class _Datastores:
    def __init__(self, main):
        self.main = main


def make_config(worker_app, worker_name, host=None, port=None, http_port=None):
    return StubConfig(
        server_name=SERVER_NAME,
        worker_app=worker_app,
        worker_name=worker_name,
        instance_name=worker_name or "master",
        worker_replication_host=host,
        worker_replication_port=port,
        worker_replication_http_port=http_port,
        send_federation=True,
        run_background_tasks=worker_app is None,
        redis_enabled=False,
        writers=Writers(),
        instance_map={},
        use_presence=True,
        update_user_directory=False,
    )


def finish_hs(hs):
    hs.get_datastores = lambda: _Datastores(hs._store)
    return hs


def row_to_json(row):
    """A parsed row object as a JSON-able list (namedtuple / attrs / EventsStreamRow)."""
    if attr.has(type(row)):
        return [row_to_json(getattr(row, a.name)) for a in attr.fields(type(row))]
    if isinstance(row, tuple):
        return [row_to_json(x) for x in row]
    if isinstance(row, list):
        return [row_to_json(x) for x in row]
    if isinstance(row, dict):
        return {k: row_to_json(v) for k, v in row.items()}
    if hasattr(row, "__dict__") and not isinstance(row, (str, int, float, bool)):
        return repr(row)
    return row
