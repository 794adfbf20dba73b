"""The CRI server's own gRPC transport (pycri.cri.h2server over csrc/h2srv.c).

Real grpcio clients and a raw HTTP/2 client (hyperframe + hpack, so it can send
what no well-behaved client would) over real unix sockets, against the real
transport: with the real servicers where the behaviour is theirs, with small
test servicers where a handler must block, fail or stream on demand.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from concurrent import futures

import grpc
import hpack
import pytest
from hyperframe import frame as hf

from pycri import errors as e
from pycri.cri import h2server
from pycri.cri import server as srv
from pycri.cri._gen import api_pb2, api_pb2_grpc
from pycri.cri.errors import rpc

from crihelpers import connect, short_tmpdir, start_in_process

Code = grpc.StatusCode
VERSION = "/runtime.v1.RuntimeService/Version"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# -- a test servicer on the real transport -------------------------------------------

class Probe(api_pb2_grpc.RuntimeServiceServicer):
    """Version's request.version picks the behaviour; Version is inline, ExecSync pooled."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.finished: list[str] = []
        self.events_done = threading.Event()
        self.slow = False  # GetContainerEvents: 500 events at once, or one per 50 ms forever
        self.produced = 0

    @rpc
    def Version(self, request, context):
        v = request.version
        if v == "notfound":
            raise e.NotFoundError("no such pod")
        if v == "odd":
            raise e.InvalidArgumentError("50% done\nnaïve\tok")
        if v == "bug":
            raise ZeroDivisionError("division by zero")
        if v.startswith("slow:"):
            self.started.set()
            time.sleep(float(v[5:]))
        if v.startswith("big:"):
            return api_pb2.VersionResponse(version="x" * int(v[4:]))
        return api_pb2.VersionResponse(version=v, runtime_name="probe")

    @rpc
    def ExecSync(self, request, context):  # pooled: may block
        self.started.set()
        self.release.wait(float(request.timeout or 30))
        self.finished.append(request.container_id)
        return api_pb2.ExecSyncResponse(stdout=request.container_id.encode())

    @rpc
    def StreamContainers(self, request, context):  # big messages for as long as wanted
        self.produced = 0
        try:
            while context.is_active():
                yield api_pb2.StreamContainersResponse(containers=[api_pb2.Container(
                    id=str(self.produced), labels={"pad": "p" * 100_000})])
                self.produced += 1
        finally:
            self.events_done.set()

    @rpc
    def GetContainerEvents(self, request, context):
        try:
            i = 0
            while context.is_active():
                yield api_pb2.ContainerEventResponse(container_id=f"c{i}", created_at=i)
                i += 1
                if i == 500 and not self.slow:
                    return
                if self.slow:
                    time.sleep(0.05)
        finally:
            self.events_done.set()


@pytest.fixture
def probe():
    d = short_tmpdir()
    servicer = Probe()
    t = h2server.H2Transport(h2server.method_table({"RuntimeService": servicer}),
                             max_message=1 << 20, workers=4)
    path = os.path.join(d, "p.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(64)
    t.add_listener(s.detach())
    t.start()
    yield t, servicer, "unix://" + path
    servicer.release.set()
    t.stop(1)
    shutil.rmtree(d, ignore_errors=True)    # (the socket file and its dir)


def stub(address: str, **opts) -> tuple[grpc.Channel, api_pb2_grpc.RuntimeServiceStub]:
    ch = grpc.insecure_channel(address, options=list(opts.items()))
    return ch, api_pb2_grpc.RuntimeServiceStub(ch)


def settled(t: h2server.H2Transport) -> dict[str, int]:
    """The transport's counters once no stream is open and no byte held (a request's
    bytes are let go at the poll after the one that handed it out): fails if that
    never comes."""
    wait_until(lambda: t.h2.stats()["streams"] == 0 and t.h2.stats()["buffered"] == 0)
    return t.h2.stats()


# -- a raw HTTP/2 client --------------------------------------------------------------

class Raw:
    """Frames by hand: whatever the test wants on the wire, however wrong."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(address[len("unix://"):])
        self.enc, self.dec = hpack.Encoder(), hpack.Decoder()
        self.window = {0: 65535}
        self.initial = 65535
        self.goaway: int | None = None
        self.backlog: list = []  # stream frames read while waiting for a window
        self.sock.sendall(PREFACE + hf.SettingsFrame(0).serialize())

    def headers(self, sid: int, path: str = VERSION, end: bool = False,
                extra: list[tuple[str, str]] | None = None, content_type="application/grpc"):
        hs = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x"),
              ("content-type", content_type), ("te", "trailers"), *(extra or [])]
        block = self.enc.encode(hs)
        first, rest = block[:16384], block[16384:]
        f = hf.HeadersFrame(sid, data=first)
        if not rest:
            f.flags.add("END_HEADERS")
        if end:
            f.flags.add("END_STREAM")
        out = [f.serialize()]
        while rest:
            c = hf.ContinuationFrame(sid, data=rest[:16384])
            rest = rest[16384:]
            if not rest:
                c.flags.add("END_HEADERS")
            out.append(c.serialize())
        self.window.setdefault(sid, self.initial)
        self.sock.sendall(b"".join(out))

    def data(self, sid: int, payload: bytes, end: bool = True, flow: bool = True) -> None:
        """DATA frames honouring the server's flow control windows (unless flow=False)."""
        view = memoryview(payload)
        while True:
            n = min(len(view), 16384)
            if flow:
                while min(self.window[0], self.window[sid]) < n:
                    self.frame()
                self.window[0] -= n
                self.window[sid] -= n
            f = hf.DataFrame(sid, data=bytes(view[:n]))
            view = view[n:]
            if end and not view:
                f.flags.add("END_STREAM")
            self.sock.sendall(f.serialize())
            if not view:
                return

    def frame(self):
        head = self._read(9)
        f, length = hf.Frame.parse_frame_header(memoryview(head))
        f.parse_body(memoryview(self._read(length)))
        if isinstance(f, hf.SettingsFrame) and "ACK" not in f.flags:
            if hf.SettingsFrame.INITIAL_WINDOW_SIZE in f.settings:
                new = f.settings[hf.SettingsFrame.INITIAL_WINDOW_SIZE]
                for sid in self.window:
                    if sid:
                        self.window[sid] += new - self.initial
                self.initial = new
            self.sock.sendall(hf.SettingsFrame(0, flags=["ACK"]).serialize())
        elif isinstance(f, hf.WindowUpdateFrame):
            self.window[f.stream_id] = self.window.get(f.stream_id, self.initial) + \
                f.window_increment
        elif isinstance(f, hf.PingFrame) and "ACK" not in f.flags:
            self.sock.sendall(hf.PingFrame(0, opaque_data=f.opaque_data,
                                           flags=["ACK"]).serialize())
        elif isinstance(f, hf.GoAwayFrame):
            self.goaway = f.error_code
        elif isinstance(f, (hf.HeadersFrame, hf.ContinuationFrame)):
            f.decoded = self.dec.decode(f.data)
        if f.stream_id:
            self.backlog.append(f)
        return f

    def _read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError("server closed the connection")
            out += chunk
        return out

    def answer(self, sid: int) -> dict:
        """Headers, messages, trailers (or a reset) of one stream."""
        got: dict = {"headers": {}, "data": b"", "reset": None}
        while True:
            if not self.backlog:
                self.frame()
                continue
            f = self.backlog.pop(0)
            if f.stream_id != sid:
                continue
            if isinstance(f, (hf.HeadersFrame, hf.ContinuationFrame)):
                got["headers"].update(dict(f.decoded))
            elif isinstance(f, hf.DataFrame):
                got["data"] += f.data
            elif isinstance(f, hf.RstStreamFrame):
                got["reset"] = f.error_code
                return got
            if "END_STREAM" in f.flags:
                return got

    def close(self) -> None:
        self.sock.close()


def grpc_frame(msg: bytes, flag: int = 0, declared: int | None = None) -> bytes:
    n = len(msg) if declared is None else declared
    return bytes([flag]) + n.to_bytes(4, "big") + msg


# -- unary calls, errors, unknown methods -----------------------------------------------

def test_default_transport_is_h2_and_serves_real_rpcs(dirs):
    server = start_in_process(dirs)
    try:
        assert server._h2 is not None and server._grpc is None
        c = connect(server.address)
        v = c.runtime.Version(api_pb2.VersionRequest(), timeout=10)
        assert (v.runtime_name, v.runtime_api_version) == ("pycri", "v1")
        assert list(c.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images) == []
        assert c.images.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=10).image_filesystems
        with pytest.raises(grpc.RpcError) as exc:
            c.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id="nope"),
                                      timeout=10)
        assert exc.value.code() == Code.NOT_FOUND
        c.channel.close()
    finally:
        server.stop(grace=1)


def test_grpcio_transport_still_selectable(dirs):
    server = start_in_process(dirs, transport="grpcio")
    try:
        assert server._grpc is not None and server._h2 is None
        c = connect(server.address)
        assert c.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name == "pycri"
        c.channel.close()
    finally:
        server.stop(grace=1)


def test_errors_map_to_codes_with_their_messages(probe):
    t, _, address = probe
    ch, rt = stub(address)
    assert rt.Version(api_pb2.VersionRequest(version="hi"), timeout=10).version == "hi"
    for what, code, text in [("notfound", Code.NOT_FOUND, "no such pod"),
                             ("odd", Code.INVALID_ARGUMENT, "50% done\nnaïve\tok"),
                             ("bug", Code.INTERNAL,
                              "internal error: ZeroDivisionError: division by zero")]:
        with pytest.raises(grpc.RpcError) as exc:
            rt.Version(api_pb2.VersionRequest(version=what), timeout=10)
        assert (exc.value.code(), exc.value.details()) == (code, text)
    # a method the servicer does not define answers as grpc's generated base does
    with pytest.raises(grpc.RpcError) as exc:
        rt.Attach(api_pb2.AttachRequest(), timeout=10)
    assert exc.value.code() == Code.UNIMPLEMENTED
    ch.close()


@pytest.mark.parametrize("path", ["/runtime.v1.RuntimeService/NoSuchCall",
                                  "/other.Service/Version", "/" + "x" * 300])
def test_unknown_method_is_unimplemented(probe, path):
    _, _, address = probe
    ch = grpc.insecure_channel(address)
    call = ch.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as exc:
        call(b"", timeout=10)
    assert exc.value.code() == Code.UNIMPLEMENTED
    ch.close()


def test_oversize_request_and_answer_are_resource_exhausted(probe):
    t, _, address = probe  # max_message 1 MiB here
    ch, rt = stub(address, **{"grpc.max_send_message_length": -1,
                              "grpc.max_receive_message_length": -1})
    with pytest.raises(grpc.RpcError) as exc:
        rt.Version(api_pb2.VersionRequest(version="x" * (3 << 20)), timeout=20)
    assert exc.value.code() == Code.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as exc:
        rt.Version(api_pb2.VersionRequest(version=f"big:{2 << 20}"), timeout=20)
    assert exc.value.code() == Code.RESOURCE_EXHAUSTED
    # the connection goes on serving, and holds nothing afterwards
    assert rt.Version(api_pb2.VersionRequest(version=f"big:{900 << 10}"),
                      timeout=20).version == "x" * (900 << 10)
    assert settled(t)["buffered"] == 0
    ch.close()


def test_real_server_refuses_requests_over_16_mib(dirs):
    server = start_in_process(dirs)
    try:
        ch = grpc.insecure_channel(server.address, options=[
            ("grpc.max_send_message_length", -1)])
        rt = api_pb2_grpc.RuntimeServiceStub(ch)
        with pytest.raises(grpc.RpcError) as exc:
            rt.Version(api_pb2.VersionRequest(version="v" * (srv.MAX_MESSAGE + 10)), timeout=30)
        assert exc.value.code() == Code.RESOURCE_EXHAUSTED
        assert "exceeds" in exc.value.details()
        ch.close()
    finally:
        server.stop(grace=1)


def test_compressed_requests_are_unimplemented(probe):
    _, _, address = probe
    ch, rt = stub(address)
    with pytest.raises(grpc.RpcError) as exc:
        rt.Version(api_pb2.VersionRequest(version="z" * 1000), timeout=10,
                   compression=grpc.Compression.Gzip)
    assert exc.value.code() == Code.UNIMPLEMENTED
    assert "gzip" in exc.value.details()
    ch.close()


# -- framing a grpc client would never send ----------------------------------------------

def test_bad_framing_gets_a_status_and_the_connection_survives(probe):
    t, _, address = probe
    body = api_pb2.VersionRequest(version="ok").SerializeToString()
    raw = Raw(address)
    cases = [  # (frames of the request, status, words in grpc-message)
        (grpc_frame(body, flag=1), "12", "compressed"),
        (grpc_frame(body, flag=7), "13", "prefix"),
        (grpc_frame(body, declared=len(body) + 4), "13", "truncated"),
        (b"", "13", "no message"),
        (b"\x00\x00", "13", "truncated"),
        (grpc_frame(body) + grpc_frame(body), "12", "more than one"),
        (grpc_frame(b"\xff\xff\xff"), "13", "cannot parse"),
    ]
    sid = 1
    for payload, status, words in cases:
        raw.headers(sid, end=not payload)
        if payload:
            raw.data(sid, payload)
        got = raw.answer(sid)
        assert got["headers"].get("grpc-status") == status, (payload, got)
        assert words in got["headers"].get("grpc-message", ""), got
        sid += 2
    # declared too large: answered as soon as the prefix arrives, the body never sent
    raw.headers(sid)
    raw.data(sid, grpc_frame(b"", declared=50 << 20), end=False)
    got = raw.answer(sid)
    assert got["headers"]["grpc-status"] == "8"
    sid += 2
    # not gRPC at all: plain HTTP statuses
    raw.headers(sid, content_type="text/plain", end=True)
    assert raw.answer(sid)["headers"][":status"] == "415"
    sid += 2
    # still serving on the same connection
    raw.headers(sid)
    raw.data(sid, grpc_frame(body))
    got = raw.answer(sid)
    assert got["headers"]["grpc-status"] == "0"
    assert api_pb2.VersionResponse.FromString(got["data"][5:]).version == "ok"
    raw.close()
    st = settled(t)
    assert st["connections"] == 0 or st["streams"] == 0
    wait_until(lambda: t.h2.stats()["connections"] == 0 and t.h2.stats()["buffered"] == 0)


# -- concurrency, streaming, cancellation, disconnects --------------------------------------

def test_many_concurrent_calls_from_several_threads(probe):
    t, servicer, address = probe
    servicer.release.set()
    shared, rt_shared = stub(address)
    errors: list[object] = []

    def worker(n: int) -> None:
        ch, own = stub(address)
        try:
            for i in range(150):
                rt = own if i % 2 else rt_shared
                v = f"{n}-{i}"
                assert rt.Version(api_pb2.VersionRequest(version=v), timeout=10).version == v
                if i % 25 == 0:  # a pooled call among the inline ones
                    r = rt.ExecSync(api_pb2.ExecSyncRequest(container_id=v, timeout=1),
                                    timeout=10)
                    assert r.stdout == v.encode()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            ch.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors[:3]
    assert len(servicer.finished) == 8 * 6
    st = settled(t)
    assert st["requests"] >= 8 * 156 and st["buffered"] == 0
    shared.close()


def test_an_inline_method_that_turns_slow_moves_off_the_polling_thread(probe):
    t, servicer, address = probe
    ch, rt = stub(address)
    assert rt.Version(api_pb2.VersionRequest(version="slow:0.05"), timeout=10)  # inline
    servicer.started.clear()
    pool = futures.ThreadPoolExecutor(1)
    slow = pool.submit(rt.Version, api_pb2.VersionRequest(version="slow:1.5"), timeout=10)
    assert servicer.started.wait(5)
    t0 = time.monotonic()
    assert rt.Version(api_pb2.VersionRequest(version="quick"), timeout=10).version == "quick"
    assert time.monotonic() - t0 < 1.0  # not queued behind the slow call
    assert not slow.done()
    assert slow.result(10).version.startswith("slow:")
    # quick again: back on the polling thread
    rt.Version(api_pb2.VersionRequest(version="q"), timeout=10)
    wait_until(lambda: t._cost["Version"] < h2server.INLINE_BUDGET)
    ch.close()
    pool.shutdown()


def test_server_streaming_in_order_through_flow_control(probe):
    t, _, address = probe
    ch, rt = stub(address)
    # 500 messages with no pause between the first ones: more than one window's worth
    got = [ev.container_id for ev in rt.GetContainerEvents(
        api_pb2.GetEventsRequest(), timeout=60)]
    assert got == [f"c{i}" for i in range(500)]
    assert settled(t)["buffered"] == 0
    ch.close()


def test_real_get_container_events_streams_published_events(dirs):
    server = start_in_process(dirs)
    try:
        hub = server._h2.methods[b"/runtime.v1.RuntimeService/GetContainerEvents"] \
            .handler.__self__.events
        c = connect(server.address)
        stream = c.runtime.GetContainerEvents(api_pb2.GetEventsRequest(), timeout=30)
        wait_until(lambda: hub.active)
        for i in range(3):
            hub._publish(api_pb2.ContainerEventResponse(container_id=f"ev{i}",
                                                        container_event_type=i))
        assert [next(stream).container_id for _ in range(3)] == ["ev0", "ev1", "ev2"]
        stream.cancel()
        wait_until(lambda: not hub.active)  # the subscriber left when the client did
        c.channel.close()
    finally:
        server.stop(grace=1)


def test_client_cancel_mid_stream_frees_the_worker_and_stream(probe):
    t, servicer, address = probe
    servicer.slow = True
    ch, rt = stub(address)
    events = rt.GetContainerEvents(api_pb2.GetEventsRequest(), timeout=60)
    assert next(events).container_id == "c0"
    assert next(events).container_id == "c1"
    assert not servicer.events_done.is_set()
    events.cancel()
    assert servicer.events_done.wait(5)  # the generator saw is_active() go false
    st = settled(t)
    assert st["buffered"] == 0
    wait_until(lambda: t._inflight == 0)
    ch.close()


def test_client_gone_mid_request_leaks_nothing(probe):
    t, _, address = probe
    body = api_pb2.VersionRequest(version="v" * 50000).SerializeToString()
    for _ in range(5):
        raw = Raw(address)
        raw.headers(1)
        raw.data(1, grpc_frame(body)[:30000], end=False)  # half a message, then gone
        raw.close()
    wait_until(lambda: t.h2.stats()["connections"] == 0)
    st = t.h2.stats()
    assert (st["streams"], st["buffered"]) == (0, 0)
    ch, rt = stub(address)
    assert rt.Version(api_pb2.VersionRequest(version="after"), timeout=10).version == "after"
    ch.close()


def test_client_gone_while_its_call_runs_loses_nothing(probe):
    t, servicer, address = probe
    raw = Raw(address)
    raw.headers(1, path="/runtime.v1.RuntimeService/ExecSync")
    raw.data(1, grpc_frame(api_pb2.ExecSyncRequest(container_id="kept",
                                                   timeout=30).SerializeToString()))
    assert servicer.started.wait(10)
    raw.close()
    wait_until(lambda: t.h2.stats()["connections"] == 0)
    servicer.release.set()
    wait_until(lambda: t._inflight == 0)
    assert servicer.finished == ["kept"]  # the handler ran to its end
    st = t.h2.stats()
    assert (st["streams"], st["buffered"]) == (0, 0)


def test_shutdown_with_a_call_in_flight_answers_it_then_refuses(probe):
    t, servicer, address = probe
    ch, rt = stub(address)
    pool = futures.ThreadPoolExecutor(1)
    fut = pool.submit(rt.ExecSync, api_pb2.ExecSyncRequest(container_id="late", timeout=30),
                      timeout=30)
    assert servicer.started.wait(10)
    stopper = threading.Thread(target=t.stop, args=(10,))
    stopper.start()
    time.sleep(0.3)
    servicer.release.set()
    assert fut.result(10).stdout == b"late"
    stopper.join(10)
    assert not stopper.is_alive()
    with pytest.raises(grpc.RpcError) as exc:
        rt.Version(api_pb2.VersionRequest(), timeout=2)
    assert exc.value.code() in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)
    ch.close()
    pool.shutdown()


# -- hostile peers ---------------------------------------------------------------------------

def test_garbage_instead_of_http2_closes_only_that_connection(probe):
    t, _, address = probe
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096), PREFACE + b"\xff" * 64):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(address[len("unix://"):])
        s.sendall(junk)
        closed = False
        try:
            while s.recv(65536):
                pass  # the server may say GOAWAY first
            closed = True
        except ConnectionResetError:
            closed = True
        assert closed
        s.close()
    wait_until(lambda: t.h2.stats()["connections"] == 0)
    ch, rt = stub(address)
    assert rt.Version(api_pb2.VersionRequest(version="fine"), timeout=10).version == "fine"
    ch.close()


def test_huge_header_blocks_are_refused_without_holding_them(probe):
    t, _, address = probe
    # past our limit but within nghttp2's: the stream gets RESOURCE_EXHAUSTED
    raw = Raw(address)
    raw.headers(1, end=True, extra=[(f"x-junk-{i}", "j" * 6000) for i in range(4)])
    got = raw.answer(1)
    assert got["headers"].get("grpc-status") == "8", got
    raw.close()
    # 256 KiB in CONTINUATION frames: nghttp2 gives up on the connection
    raw = Raw(address)
    try:
        raw.headers(1, end=True, extra=[(f"x-junk-{i}", "j" * 4000) for i in range(64)])
        got = raw.answer(1)
        assert got["reset"] is not None or got["headers"].get("grpc-status") == "8", got
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass
    raw.close()
    wait_until(lambda: t.h2.stats()["connections"] == 0)
    assert t.h2.stats()["buffered"] == 0
    ch, rt = stub(address)
    assert rt.Version(api_pb2.VersionRequest(version="ok"), timeout=10).version == "ok"
    ch.close()


def test_endless_data_is_dropped_not_buffered(probe):
    t, _, address = probe  # max_message 1 MiB
    raw = Raw(address)
    raw.headers(1)
    raw.data(1, grpc_frame(b"", declared=1000) + b"a" * 1000, end=False)
    peak = 0
    for _ in range(40):  # 40 MiB more, within the flow control windows
        raw.data(1, b"b" * (1 << 20), end=False)
        peak = max(peak, t.h2.stats()["buffered"])
    assert peak < (2 << 20), peak
    raw.data(1, b"", end=True)
    got = raw.answer(1)
    assert got["headers"]["grpc-status"] == "12" and "more than one" in \
        got["headers"]["grpc-message"]
    raw.close()
    wait_until(lambda: t.h2.stats()["connections"] == 0)
    assert t.h2.stats()["buffered"] == 0


def test_streams_past_the_limit_are_refused(probe):
    t, _, address = probe
    raw = Raw(address)
    for i in range(h2server.MAX_STREAMS + 20):  # opened and never finished
        raw.headers(1 + 2 * i)
    refused = 0
    deadline = time.monotonic() + 10
    while refused < 20 and time.monotonic() < deadline:
        f = raw.frame()
        if isinstance(f, hf.RstStreamFrame):
            refused += 1
    assert refused == 20
    assert t.h2.stats()["streams"] <= h2server.MAX_STREAMS
    raw.close()
    wait_until(lambda: t.h2.stats()["streams"] == 0 and t.h2.stats()["connections"] == 0)


def test_a_stream_nobody_reads_stops_its_producer(probe):
    t, servicer, address = probe
    raw = Raw(address)
    raw.headers(1, path="/runtime.v1.RuntimeService/StreamContainers")
    raw.data(1, grpc_frame(b""))
    time.sleep(1.5)  # never reads: the HTTP/2 window (64 KiB) fills, then the backlog
    produced = servicer.produced
    held = t.h2.stats()["buffered"]
    assert 40 <= produced <= 60, produced  # ~4 MiB of 100 kB messages, then it waits
    assert held < (5 << 20), held
    time.sleep(0.5)
    assert servicer.produced == produced  # still waiting
    raw.close()
    assert servicer.events_done.wait(5)  # the producer ended with the connection
    wait_until(lambda: t._inflight == 0)
    wait_until(lambda: t.h2.stats()["connections"] == 0 and t.h2.stats()["buffered"] == 0)


# frame type -> the payload length it must have (SETTINGS: a multiple of 6)
_CONTROL_SIZES = {2: 5, 3: 4, 4: 6, 6: 8, 7: 8, 8: 4, 9: 5, 0x42: 3}


def _random_frames(rnd, enc: hpack.Encoder) -> bytes:
    """A burst of frames, mostly plausible, some not: request headers on fresh
    streams, gRPC messages with odd flags and lengths on them, control frames with
    random contents (and now and then the wrong size or stream), unknown types."""
    out = []
    opened: list[int] = []
    for i in range(rnd.randint(1, 30)):
        kind = 0 if i == 0 else rnd.randrange(10)
        flags = rnd.randrange(256)
        if kind < 4:
            sid = 2 * len(opened) + 1 if rnd.random() < 0.95 else rnd.choice([0, 2])
            opened.append(sid)
            payload = enc.encode([(":method", "POST"), (":scheme", "http"),
                                  (":path", rnd.choice([VERSION, VERSION, "/x", "/" + "a" * 200])),
                                  (":authority", "x"), ("content-type", "application/grpc"),
                                  ("grpc-timeout", rnd.choice(["1S", "99999999n", "x"]))])
            ftype, flags = 1, rnd.choice([4, 4, 5, flags & ~0x08])
        elif kind < 8:
            sid = rnd.choice(opened)
            msg = api_pb2.VersionRequest(version="f" * rnd.randrange(20)).SerializeToString()
            length = rnd.choice([len(msg), len(msg), len(msg), len(msg) + 1, 0, 2**31])
            payload = bytes([rnd.choice([0, 0, 0, 0, 1, 7])]) + length.to_bytes(4, "big") + msg
            payload = payload[:rnd.choice([len(payload)] * 4 + [3])]
            ftype, flags = 0, rnd.choice([1, 1, 1, 0, flags & ~0x08])
        else:
            ftype = rnd.choice(list(_CONTROL_SIZES))
            size = _CONTROL_SIZES[ftype] * (rnd.randrange(3) if ftype == 4 else 1)
            sid = 0 if ftype in (4, 6, 7) else rnd.choice(opened)
            if rnd.random() < 0.15:  # wrong on purpose
                size, sid = rnd.choice([0, 1, 7, 40]), rnd.choice([0, 1, 2, 2**31 - 1])
            payload = rnd.randbytes(size)
            flags = 0 if rnd.random() < 0.8 else flags
        head = len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big")
        out.append(head + payload)
    return b"".join(out)


def test_random_frames_never_hurt_the_server(probe):
    import random

    t, _, address = probe
    for seed in range(300):
        rnd = random.Random(seed)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(address[len("unix://"):])
        try:
            s.sendall(PREFACE + hf.SettingsFrame(0).serialize() +
                      _random_frames(rnd, hpack.Encoder()))
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass  # whatever the server answers, until it closes
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            pass
        finally:
            s.close()
    wait_until(lambda: t.h2.stats()["connections"] == 0)
    st = t.h2.stats()
    assert (st["streams"], st["buffered"]) == (0, 0)
    assert st["requests"] >= 5 and st["rejected"] >= 100  # bursts got past the framing
    ch, rt = stub(address)
    assert rt.Version(api_pb2.VersionRequest(version="alive"), timeout=10).version == "alive"
    ch.close()
