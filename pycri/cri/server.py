"""The CRI v1 gRPC server: kubelet, crictl and critest talk to pycri through it.

This layer stores nothing. Each RPC converts its request (pycri.cri.convert),
makes one call into the library (a pycri.Runtime), and converts the answer
back; failures go through the one status table in pycri.cri.errors. Whatever
the server knows, it reads from the Runtime, so a restart loses nothing.

    python -m pycri.cri --listen unix:///run/pycri/pycri.sock

The unix socket's directory is created 0700 and the socket is bound under a
umask that makes it 0660 from its first moment. A server that is already
serving the path (found by a lock file beside it, or by connecting) makes a
second one refuse to start; a stale socket file left by a crash is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import queue
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import asdict, dataclass
from typing import Any

# pycri's C core forks (launch, namespace pinning) from gRPC worker threads. gRPC's
# fork support installs pthread_atfork handlers whose child half crashes such a child
# (SIGSEGV, "epoll_wait error" in the parent). The server never uses gRPC in a forked
# child, so it turns fork support off before gRPC starts.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc  # noqa: E402

import pycri  # noqa: E402
from pycri.cri import convert, metrics
from pycri.cri._gen import api_pb2, api_pb2_grpc
from pycri.container import EXITED, RUNNING
from pycri.cri.backend import RuntimeBackend
from pycri.cri.errors import rpc
from pycri.cri.streaming import StreamingServer
from pycri.errors import (
    InvalidArgumentError,
    InvalidStateError,
    NotFoundError,
    PycriError,
    UnsupportedError,
)
from pycri.sandbox import READY
from pycri.runtime import DEFAULT_ROOT, DEFAULT_STATE

log = logging.getLogger("pycri.cri")

KUBE_RUNTIME_API_VERSION = "0.1.0"  # VersionResponse.version: the CRI's own fixed value
RUNTIME_NAME = "pycri"
RUNTIME_API_VERSION = "v1"
DEFAULT_LISTEN = "unix:///run/pycri/pycri.sock"
DEFAULT_SANDBOX_IMAGE = "registry.k8s.io/pause:3.10"
DEFAULT_HANDLER = ""  # the only runtime handler for now
SHUTDOWN_GRACE = 10.0  # seconds in-flight calls get to finish after SIGTERM
MAX_MESSAGE = 16 << 20  # same as containerd's; kubelet's ListContainers can be large
STREAM_CHUNK = 256  # items per message of the Stream* list RPCs
_SUN_PATH_MAX = 107
EXEC_SYNC_OUTPUT_LIMIT = 16 << 20  # per stream; the rest is read and dropped (CVE-2022-31030)
EVENT_QUEUE_DEPTH = 1000  # events buffered per GetContainerEvents subscriber


class ServerError(Exception):
    """The server cannot start: bad address, socket in use, and the like."""


@dataclass(frozen=True)
class ServerOptions:
    listen: str = DEFAULT_LISTEN
    root: str = DEFAULT_ROOT
    state: str = DEFAULT_STATE
    registry_config_dir: str | None = None
    cni_bin_dir: str = "/usr/lib/cni"
    cni_conf_dir: str = "/etc/cni/net.d"
    sandbox_image: str = DEFAULT_SANDBOX_IMAGE
    workers: int = 32
    transport: str = "h2"  # "h2": pycri.cri.h2server (C, libnghttp2); "grpcio": grpcio's server


def _check_handler(name: str) -> None:
    if name != DEFAULT_HANDLER:
        raise InvalidArgumentError(f"unknown runtime handler {name!r} (pycri has only the "
                                   "default handler \"\")")


# -- ImageService ---------------------------------------------------------------------

class ImageService(api_pb2_grpc.ImageServiceServicer):
    """CRI ImageService over a pycri Runtime's ImageStore."""

    def __init__(self, runtime: pycri.Runtime, options: ServerOptions) -> None:
        self.rt = runtime
        self.pinned_refs = (options.sandbox_image,) if options.sandbox_image else ()
        self._pinned = convert.pinned_names(self.pinned_refs)
        # The store hands out one Image per version of its record and names: its
        # message is built once (responses copy it in).
        self._protos = convert.ObjectMemo(1024)

    def _make_proto(self, img: pycri.Image) -> api_pb2.Image:
        return convert.image_to_proto(img, pinned=convert.is_pinned(img, self._pinned))

    def _to_proto(self, img: pycri.Image) -> api_pb2.Image:
        return self._protos.get(img, self._make_proto)  # type: ignore[no-any-return]

    def _listed(self, spec: api_pb2.ImageSpec) -> list[api_pb2.Image]:
        # A filter names one image (tag, digest reference, id or id prefix).
        if spec.image:
            found = self.rt.images.status(spec.image)
            return [self._to_proto(found)] if found else []
        return [self._to_proto(i) for i in self.rt.images.list()]

    @rpc
    def ListImages(self, request: Any, context: Any) -> Any:
        return api_pb2.ListImagesResponse(images=self._listed(request.filter.image))

    @rpc
    def StreamImages(self, request: Any, context: Any) -> Iterator[Any]:
        images = self._listed(request.filter.image)
        for i in range(0, len(images), STREAM_CHUNK):
            yield api_pb2.StreamImagesResponse(images=images[i:i + STREAM_CHUNK])

    @rpc
    def ImageStatus(self, request: Any, context: Any) -> Any:
        img = self.rt.images.status(convert.image_name(request.image))
        if img is None:
            return api_pb2.ImageStatusResponse()  # CRI: absent image -> OK, image unset
        info = convert.image_info(img) if request.verbose else {}
        return api_pb2.ImageStatusResponse(image=self._to_proto(img), info=info)

    @rpc
    def PullImage(self, request: Any, context: Any) -> Any:
        ref = convert.image_name(request.image)
        _check_handler(request.image.runtime_handler)
        auth = convert.auth_from_proto(request.auth if request.HasField("auth") else None,
                                       convert.registry_of(ref))
        t0 = time.monotonic()
        img = self.rt.images.pull(ref, auth=auth)
        log.info("pulled %s as %s in %.2f s", ref, img.id, time.monotonic() - t0)
        return api_pb2.PullImageResponse(image_ref=img.id)

    @rpc
    def RemoveImage(self, request: Any, context: Any) -> Any:
        # CRI: removing by one name removes the image with all its names; and a
        # missing image is not an error.
        img = self.rt.images.status(convert.image_name(request.image))
        if img is not None:
            with contextlib.suppress(NotFoundError):  # removed meanwhile by someone else
                self.rt.images.remove(img.id, collect=False)
        return api_pb2.RemoveImageResponse()

    @rpc
    def ImageFsInfo(self, request: Any, context: Any) -> Any:
        usage = convert.fs_usage(self.rt.images.fs_info())
        # Containers' writable layers will live on the same filesystem as the images.
        return api_pb2.ImageFsInfoResponse(image_filesystems=[usage],
                                           container_filesystems=[usage])


# -- RuntimeService ---------------------------------------------------------------------

class RuntimeService(api_pb2_grpc.RuntimeServiceServicer):
    """CRI RuntimeService: each RPC converts, makes one library call, converts back.
    Exec, Attach and PortForward hand out URLs of ``streaming``; lifecycle RPCs
    publish to ``events`` (GetContainerEvents)."""

    def __init__(self, runtime: pycri.Runtime, options: ServerOptions,
                 streaming: StreamingServer | None = None) -> None:
        self.rt = runtime
        self.options = options
        self.streaming = streaming or StreamingServer(RuntimeBackend(runtime))
        self.events = EventHub(runtime)
        self.metrics = metrics.Collector(runtime)

    # implemented ---------------------------------------------------------------------

    @rpc
    def Version(self, request: Any, context: Any) -> Any:
        return api_pb2.VersionResponse(version=KUBE_RUNTIME_API_VERSION,
                                       runtime_name=RUNTIME_NAME,
                                       runtime_version=pycri.__version__,
                                       runtime_api_version=RUNTIME_API_VERSION)

    @rpc
    def Status(self, request: Any, context: Any) -> Any:
        o = self.options
        cni = self.rt.cni
        network_ready, why = cni.status() if cni else (False, "no CNI config directory given")
        conditions = [api_pb2.RuntimeCondition(type="RuntimeReady", status=True),
                      convert.network_condition(network_ready, why)]
        # Recursive read-only binds: mount_setattr(AT_RECURSIVE) in csrc/mount.c. User
        # namespaces: one uid and one gid mapping per pod; the image's files are not
        # id-mapped (they show as the overflow id inside), the writable layer is.
        handler = api_pb2.RuntimeHandler(name=DEFAULT_HANDLER, features=api_pb2.RuntimeHandlerFeatures(
            recursive_read_only_mounts=True, user_namespaces=True))
        info = {"config": json.dumps(asdict(o), sort_keys=True),
                "runtime": json.dumps({"root": self.rt.root, "state": self.rt.state,
                                       "version": pycri.__version__})} if request.verbose else {}
        return api_pb2.StatusResponse(status=api_pb2.RuntimeStatus(conditions=conditions),
                                      runtime_handlers=[handler], info=info,
                                      features=api_pb2.RuntimeFeatures(
                                          supplemental_groups_policy=True))

    @rpc
    def RuntimeConfig(self, request: Any, context: Any) -> Any:
        return api_pb2.RuntimeConfigResponse(
            linux=api_pb2.LinuxRuntimeConfiguration(cgroup_driver=api_pb2.CGROUPFS))

    @rpc
    def UpdateRuntimeConfig(self, request: Any, context: Any) -> Any:
        cidr = request.runtime_config.network_config.pod_cidr
        if cidr:  # nothing to store: CNI's own config decides pod addresses
            log.info("kubelet reports pod CIDR %s", cidr)
        return api_pb2.UpdateRuntimeConfigResponse()

    # pod sandboxes ------------------------------------------------------------------------

    @rpc
    def RunPodSandbox(self, request: Any, context: Any) -> Any:
        _check_handler(request.runtime_handler)
        sb = self.rt.run_sandbox(convert.sandbox_config(request.config, request.runtime_handler))
        return api_pb2.RunPodSandboxResponse(pod_sandbox_id=sb.id)

    def _sandbox(self, sandbox_id: str) -> pycri.Sandbox:
        if not sandbox_id:
            raise InvalidArgumentError("pod_sandbox_id must not be empty")
        return self.rt.sandbox(sandbox_id)

    # The lifecycle RPCs read the states their events report only while someone
    # listens (GetContainerEvents): without subscribers that is work for nobody.

    @rpc
    def StopPodSandbox(self, request: Any, context: Any) -> Any:
        with contextlib.suppress(NotFoundError):  # CRI: stopping a missing pod is OK
            sb = self._sandbox(request.pod_sandbox_id)
            running = [c for c in sb.containers() if _state_or(c, "") == RUNNING] \
                if self.events.active else []
            sb.stop()
            for c in running:
                self.events.container(c, api_pb2.CONTAINER_STOPPED_EVENT)
        return api_pb2.StopPodSandboxResponse()

    @rpc
    def RemovePodSandbox(self, request: Any, context: Any) -> Any:
        with contextlib.suppress(NotFoundError):  # CRI: removing a missing pod is OK
            sb = self._sandbox(request.pod_sandbox_id)
            gone = [(c.id, _status_or_none(c)) for c in sb.containers()] \
                if self.events.active else []
            sb.remove()
            for cid, st in gone:
                self.events.deleted(cid, st, sb)
        return api_pb2.RemovePodSandboxResponse()

    @rpc
    def PodSandboxStatus(self, request: Any, context: Any) -> Any:
        sb = self._sandbox(request.pod_sandbox_id)
        st = sb.status()
        containers = sb.containers()
        reply = convert.sandbox_status(st)
        if request.verbose:
            reply.info["info"] = convert.sandbox_info(st, [c.id for c in containers])
        # the pod's containers too, as evented PLEG wants them
        for c in containers:
            cs = _status_or_none(c)
            if cs is not None:
                reply.containers_statuses.append(convert.container_status(cs))
        reply.timestamp = time.time_ns()
        return reply

    def _sandboxes(self, f: Any) -> list[api_pb2.PodSandbox]:
        want = convert.sandbox_filter(f)
        out = []
        for sb in self.rt.sandboxes():
            with contextlib.suppress(NotFoundError):
                st = sb.status()
                if convert.sandbox_matches(st, **want):
                    out.append(convert.sandbox_to_proto(st))
        return out

    @rpc
    def ListPodSandbox(self, request: Any, context: Any) -> Any:
        return api_pb2.ListPodSandboxResponse(items=self._sandboxes(
            request.filter if request.HasField("filter") else None))

    @rpc
    def StreamPodSandboxes(self, request: Any, context: Any) -> Iterator[Any]:
        items = self._sandboxes(request.filter if request.HasField("filter") else None)
        for i in range(0, len(items), STREAM_CHUNK):
            yield api_pb2.StreamPodSandboxesResponse(pod_sandboxes=items[i:i + STREAM_CHUNK])

    @rpc
    def UpdatePodSandboxResources(self, request: Any, context: Any) -> Any:
        self._sandbox(request.pod_sandbox_id).update_resources(convert.sandbox_resources(
            request.overhead if request.HasField("overhead") else None,
            request.resources if request.HasField("resources") else None))
        return api_pb2.UpdatePodSandboxResourcesResponse()

    # containers -------------------------------------------------------------------------

    def _container(self, container_id: str) -> pycri.Container:
        if not container_id:
            raise InvalidArgumentError("container_id must not be empty")
        return self.rt.container(container_id)

    @rpc
    def CreateContainer(self, request: Any, context: Any) -> Any:
        sb = self._sandbox(request.pod_sandbox_id)
        name = convert.image_name(request.config.image, "ContainerConfig.image")
        img = self.rt.images.status(name)
        if img is None:
            raise NotFoundError(f"image {name!r} not found: pull it first")
        cfg = convert.container_config(request.config, img.id, sb.config.log_directory)
        c = sb.create_container(cfg)
        self.events.container(c, api_pb2.CONTAINER_CREATED_EVENT)
        return api_pb2.CreateContainerResponse(container_id=c.id)

    @rpc
    def StartContainer(self, request: Any, context: Any) -> Any:
        c = self._container(request.container_id)
        c.start()
        self.events.container(c, api_pb2.CONTAINER_STARTED_EVENT)
        return api_pb2.StartContainerResponse()

    @rpc
    def StopContainer(self, request: Any, context: Any) -> Any:
        with contextlib.suppress(NotFoundError):  # CRI: stopping a missing container is OK
            c = self._container(request.container_id)
            was = _state_or(c, "") if self.events.active else EXITED
            c.stop(timeout=max(0, request.timeout))
            if was != EXITED:
                self.events.container(c, api_pb2.CONTAINER_STOPPED_EVENT)
        return api_pb2.StopContainerResponse()

    @rpc
    def RemoveContainer(self, request: Any, context: Any) -> Any:
        with contextlib.suppress(NotFoundError):  # CRI: removing a missing container is OK
            c = self._container(request.container_id)
            if not self.events.active:
                c.remove()
                return api_pb2.RemoveContainerResponse()
            st = _status_or_none(c)
            c.remove()
            self.events.deleted(c.id, st, None)
        return api_pb2.RemoveContainerResponse()

    def _containers(self, f: Any) -> list[pycri.Container]:
        want = convert.container_filter(f)
        sandbox_id = want.get("sandbox_id") or None
        if sandbox_id:
            try:
                sandbox_id = self.rt.sandbox(sandbox_id).id
            except (NotFoundError, InvalidArgumentError):
                return []
        return self.rt.containers(sandbox_id=sandbox_id, state=want.get("state"),
                                  labels=want.get("labels") or None,
                                  container_id=want.get("id") or None)

    def _listed(self, f: Any) -> list[api_pb2.Container]:
        out = []
        for c in self._containers(f):
            st = _status_or_none(c)
            if st is not None:
                out.append(convert.container_to_proto(st))
        return out

    @rpc
    def ListContainers(self, request: Any, context: Any) -> Any:
        return api_pb2.ListContainersResponse(containers=self._listed(
            request.filter if request.HasField("filter") else None))

    @rpc
    def StreamContainers(self, request: Any, context: Any) -> Iterator[Any]:
        items = self._listed(request.filter if request.HasField("filter") else None)
        for i in range(0, len(items), STREAM_CHUNK):
            yield api_pb2.StreamContainersResponse(containers=items[i:i + STREAM_CHUNK])

    @rpc
    def ContainerStatus(self, request: Any, context: Any) -> Any:
        st = self._container(request.container_id).status()
        info = convert.container_info(st, st.sandbox_id) if request.verbose else {}
        return api_pb2.ContainerStatusResponse(status=convert.container_status(st), info=info)

    @rpc
    def UpdateContainerResources(self, request: Any, context: Any) -> Any:
        c = self._container(request.container_id)
        c.update_resources(convert.resources(request.linux))
        return api_pb2.UpdateContainerResourcesResponse()

    @rpc
    def ReopenContainerLog(self, request: Any, context: Any) -> Any:
        self._container(request.container_id).reopen_log()
        return api_pb2.ReopenContainerLogResponse()

    @rpc
    def CheckpointContainer(self, request: Any, context: Any) -> Any:
        raise UnsupportedError("CheckpointContainer: pycri has no checkpointing (no CRIU)")

    @rpc
    def GetContainerEvents(self, request: Any, context: Any) -> Iterator[Any]:
        with self.events.subscribe() as q:
            while context.is_active():
                try:
                    event = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                yield event

    # exec, attach, port-forward -----------------------------------------------------------

    def _running(self, container_id: str) -> pycri.Container:
        c = self._container(container_id)
        state = c.state
        if state != RUNNING:
            raise InvalidStateError(f"container {c.id[:12]} is {state}, not running")
        return c

    @rpc
    def ExecSync(self, request: Any, context: Any) -> Any:
        c = self._running(request.container_id)
        if not request.cmd:
            raise InvalidArgumentError("ExecSync needs a command")
        result = c.exec_sync(list(request.cmd), timeout=request.timeout or None,
                             output_limit=EXEC_SYNC_OUTPUT_LIMIT)
        if result.timed_out:
            raise TimeoutError(f"command {list(request.cmd)!r} timed out after "
                               f"{request.timeout} s")
        return convert.exec_sync(result)

    @rpc
    def Exec(self, request: Any, context: Any) -> Any:
        self._running(request.container_id)
        return self.streaming.get_exec(request)

    @rpc
    def Attach(self, request: Any, context: Any) -> Any:
        self._running(request.container_id)
        return self.streaming.get_attach(request)

    @rpc
    def PortForward(self, request: Any, context: Any) -> Any:
        sb = self._sandbox(request.pod_sandbox_id)
        if sb.state != READY:
            raise InvalidStateError(f"sandbox {sb.id[:12]} is not ready")
        return self.streaming.get_port_forward(request)

    # stats and metrics --------------------------------------------------------------------

    def _container_stats(self, c: pycri.Container) -> api_pb2.ContainerStats:
        return self.metrics.container_stats(c)

    def _all_container_stats(self, f: Any) -> list[api_pb2.ContainerStats]:
        flt = api_pb2.ContainerFilter(id=f.id, pod_sandbox_id=f.pod_sandbox_id,
                                      label_selector=f.label_selector) if f is not None else None
        out = []
        for c in self._containers(flt):
            with contextlib.suppress(NotFoundError, PycriError, OSError):
                out.append(self._container_stats(c))
        return out

    @rpc
    def ContainerStats(self, request: Any, context: Any) -> Any:
        return api_pb2.ContainerStatsResponse(
            stats=self._container_stats(self._container(request.container_id)))

    @rpc
    def ListContainerStats(self, request: Any, context: Any) -> Any:
        return api_pb2.ListContainerStatsResponse(stats=self._all_container_stats(
            request.filter if request.HasField("filter") else None))

    @rpc
    def StreamContainerStats(self, request: Any, context: Any) -> Iterator[Any]:
        items = self._all_container_stats(request.filter if request.HasField("filter") else None)
        for i in range(0, len(items), STREAM_CHUNK):
            yield api_pb2.StreamContainerStatsResponse(container_stats=items[i:i + STREAM_CHUNK])

    def _sandbox_stats(self, sb: pycri.Sandbox) -> api_pb2.PodSandboxStats:
        return self.metrics.sandbox_stats(sb)

    def _all_sandbox_stats(self, f: Any) -> list[api_pb2.PodSandboxStats]:
        want = {"id": f.id, "labels": dict(f.label_selector)} if f is not None else {}
        out = []
        for sb in self.rt.sandboxes():
            with contextlib.suppress(NotFoundError):
                if convert.sandbox_matches(sb.status(), **want):
                    out.append(self._sandbox_stats(sb))
        return out

    @rpc
    def PodSandboxStats(self, request: Any, context: Any) -> Any:
        return api_pb2.PodSandboxStatsResponse(
            stats=self._sandbox_stats(self._sandbox(request.pod_sandbox_id)))

    @rpc
    def ListPodSandboxStats(self, request: Any, context: Any) -> Any:
        return api_pb2.ListPodSandboxStatsResponse(stats=self._all_sandbox_stats(
            request.filter if request.HasField("filter") else None))

    @rpc
    def StreamPodSandboxStats(self, request: Any, context: Any) -> Iterator[Any]:
        items = self._all_sandbox_stats(request.filter if request.HasField("filter") else None)
        for i in range(0, len(items), STREAM_CHUNK):
            yield api_pb2.StreamPodSandboxStatsResponse(pod_sandbox_stats=items[i:i + STREAM_CHUNK])

    # CRI metrics: the cAdvisor-named series (pycri.cri.metrics), read live.
    @rpc
    def ListMetricDescriptors(self, request: Any, context: Any) -> Any:
        return api_pb2.ListMetricDescriptorsResponse(descriptors=metrics.descriptors())

    @rpc
    def ListPodSandboxMetrics(self, request: Any, context: Any) -> Any:
        return api_pb2.ListPodSandboxMetricsResponse(pod_metrics=self.metrics.all_pod_metrics())

    @rpc
    def StreamPodSandboxMetrics(self, request: Any, context: Any) -> Iterator[Any]:
        items = self.metrics.all_pod_metrics()
        for i in range(0, len(items), STREAM_CHUNK):
            yield api_pb2.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=items[i:i + STREAM_CHUNK])


def _state_or(c: pycri.Container, default: str) -> str:
    try:
        return c.state
    except NotFoundError:
        return default


def _status_or_none(c: pycri.Container) -> Any:
    try:
        return c.status()
    except NotFoundError:
        return None


class EventHub:
    """GetContainerEvents: lifecycle events of the RPCs this server performs, fanned out
    to subscribers. Each subscriber has a bounded queue; a subscriber that falls behind
    loses its oldest events (kubelet relists). Nothing is kept for later subscribers:
    the events are a view, not a store."""

    def __init__(self, runtime: pycri.Runtime, depth: int = EVENT_QUEUE_DEPTH) -> None:
        self.rt = runtime
        self.depth = depth
        self._lock = threading.Lock()
        self._subscribers: list[queue.Queue[Any]] = []

    @property
    def active(self) -> bool:
        """Whether anyone listens now (a subscriber arriving later sees later events)."""
        return bool(self._subscribers)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[queue.Queue[Any]]:
        q: queue.Queue[Any] = queue.Queue(self.depth)
        with self._lock:
            self._subscribers.append(q)
        try:
            yield q
        finally:
            with self._lock:
                self._subscribers.remove(q)

    def _publish(self, event: api_pb2.ContainerEventResponse) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for q in subscribers:
            while True:
                try:
                    q.put_nowait(event)
                    break
                except queue.Full:
                    with contextlib.suppress(queue.Empty):
                        q.get_nowait()

    def _sandbox_status(self, sb: pycri.Sandbox | None) -> Any:
        if sb is None:
            return None
        try:
            return convert.sandbox_status(sb.status()).status
        except NotFoundError:
            return None

    def container(self, c: pycri.Container, kind: Any) -> None:
        if not self._subscribers:
            return
        st = _status_or_none(c)
        if st is None:
            return
        sb = None
        with contextlib.suppress(NotFoundError):
            sb = self.rt.sandbox(st.sandbox_id)
        self._emit(c.id, kind, st, sb)

    def deleted(self, container_id: str, st: Any, sb: pycri.Sandbox | None) -> None:
        if not self._subscribers:
            return
        if sb is None and st is not None:
            with contextlib.suppress(NotFoundError, InvalidArgumentError):
                sb = self.rt.sandbox(st.sandbox_id)
        self._emit(container_id, api_pb2.CONTAINER_DELETED_EVENT, st, sb)

    def _emit(self, container_id: str, kind: Any, st: Any, sb: pycri.Sandbox | None) -> None:
        event = api_pb2.ContainerEventResponse(container_id=container_id,
                                               container_event_type=kind,
                                               created_at=time.time_ns())
        sandbox_status = self._sandbox_status(sb)
        if sandbox_status is not None:
            event.pod_sandbox_status.CopyFrom(sandbox_status)
        if st is not None:
            event.containers_statuses.append(convert.container_status(st))
        self._publish(event)


# -- listening ----------------------------------------------------------------------------

def parse_listen(address: str) -> tuple[str, str]:
    """``unix:///path`` (or a bare absolute path) -> ("unix", path);
    ``tcp://127.0.0.1:PORT`` -> ("tcp", "127.0.0.1:PORT"), loopback only: CRI has no auth."""
    if address.startswith("unix://"):
        path = address[len("unix://"):]
    elif address.startswith("/"):
        path = address
    elif address.startswith("tcp://"):
        hostport = address[len("tcp://"):]
        host, sep, port = hostport.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise ServerError(f"--listen {address!r}: want tcp://HOST:PORT")
        if host.strip("[]") not in ("127.0.0.1", "::1", "localhost"):
            raise ServerError(f"--listen {address!r}: tcp is for tests and must be loopback "
                              "(CRI has no authentication)")
        return "tcp", hostport
    else:
        raise ServerError(f"--listen {address!r}: want unix:///PATH or tcp://127.0.0.1:PORT")
    if not path.startswith("/"):
        raise ServerError(f"--listen {address!r}: the socket path must be absolute")
    if len(path.encode()) > _SUN_PATH_MAX:
        raise ServerError(f"--listen: socket path longer than {_SUN_PATH_MAX} bytes: {path}")
    return "unix", os.path.normpath(path)


def _claim_unix_socket(path: str) -> int:
    """Make the socket's directory (0700), take the lock beside the socket, clear a stale
    socket file. Returns the lock fd, held for the server's life."""
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ServerError(f"cannot create {parent}: {e.strerror}") from None
    mode = stat.S_IMODE(os.stat(parent).st_mode)
    if mode & 0o077:  # not ours to chmod (it may be /tmp); say so
        log.warning("socket directory %s has mode %o: others can reach the socket's path "
                    "(the socket itself is 0660)", parent, mode)
    lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise ServerError(f"another pycri server is serving {path}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return lock_fd
    if not stat.S_ISSOCK(st.st_mode):
        os.close(lock_fd)
        raise ServerError(f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(2)
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            os.close(lock_fd)
            raise ServerError(f"cannot tell whether {path} is in use: {e}") from None
        log.info("removing stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return lock_fd
    finally:
        probe.close()
    os.close(lock_fd)
    raise ServerError(f"{path} is in use by another server")


class CriServer:
    """A running (after start()) CRI server over one pycri Runtime."""

    def __init__(self, options: ServerOptions, runtime: pycri.Runtime | None = None) -> None:
        self.options = options
        self.kind, self.target = parse_listen(options.listen)
        self.runtime = runtime or pycri.Runtime(
            root=options.root, state=options.state,
            registry_config_dir=options.registry_config_dir,
            cni_conf_dir=options.cni_conf_dir, cni_bin_dirs=(options.cni_bin_dir,))
        # exec/attach/port-forward URLs: loopback only, random port, single-use tokens
        self.streaming = StreamingServer(RuntimeBackend(self.runtime))
        self._grpc: grpc.Server | None = None
        self._h2: Any = None  # pycri.cri.h2server.H2Transport when serving with it
        self._lock_fd: int | None = None
        self._socket_ino: int | None = None
        self.address = options.listen

    def start(self) -> None:
        if self.options.transport == "h2":
            self._start_h2()
            return
        if self.options.transport != "grpcio":
            raise ServerError(f"unknown transport {self.options.transport!r} (h2 or grpcio)")
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.options.workers,
                                       thread_name_prefix="pycri-cri"),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                     ("grpc.max_send_message_length", MAX_MESSAGE)],
        )
        api_pb2_grpc.add_RuntimeServiceServicer_to_server(
            RuntimeService(self.runtime, self.options, self.streaming), server)
        api_pb2_grpc.add_ImageServiceServicer_to_server(
            ImageService(self.runtime, self.options), server)
        if self.kind == "unix":
            self._lock_fd = _claim_unix_socket(self.target)
            # The socket is created by the bind inside add_insecure_port: the umask makes
            # it 0660 from the start. (umask is per process; nothing else runs yet.)
            old = os.umask(0o117)
            try:
                server.add_insecure_port("unix://" + self.target)
            except RuntimeError as e:
                self._release()
                raise ServerError(f"cannot listen on {self.target}: {e}") from None
            finally:
                os.umask(old)
            os.chmod(self.target, 0o660)
            self._socket_ino = os.lstat(self.target).st_ino
        else:
            try:
                port = server.add_insecure_port(self.target)
            except RuntimeError as e:
                raise ServerError(f"cannot listen on {self.target}: {e}") from None
            self.address = "tcp://" + self.target.rpartition(":")[0] + f":{port}"
        try:
            self.streaming.start()
        except OSError as e:
            self._release()
            raise ServerError(f"cannot start the streaming server: {e}") from None
        server.start()
        self._grpc = server
        log.info("pycri %s serving CRI %s on %s (root %s, state %s)", pycri.__version__,
                 RUNTIME_API_VERSION, self.address, self.runtime.root, self.runtime.state)

    def _start_h2(self) -> None:
        from pycri.cri import h2server

        transport = h2server.H2Transport(h2server.method_table({
            "RuntimeService": RuntimeService(self.runtime, self.options, self.streaming),
            "ImageService": ImageService(self.runtime, self.options)}),
            max_message=MAX_MESSAGE, workers=self.options.workers)
        sock = None
        try:
            if self.kind == "unix":
                self._lock_fd = _claim_unix_socket(self.target)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                old = os.umask(0o117)  # 0660 from the bind on
                try:
                    sock.bind(self.target)
                finally:
                    os.umask(old)
                os.chmod(self.target, 0o660)
                self._socket_ino = os.lstat(self.target).st_ino
            else:
                host, _, port = self.target.rpartition(":")
                host = host.strip("[]")
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, int(port)))
                bound = sock.getsockname()[1]
                self.address = "tcp://" + self.target.rpartition(":")[0] + f":{bound}"
            sock.listen(1024)
            transport.add_listener(sock.detach())
            self.streaming.start()
        except (OSError, ServerError) as e:
            if sock is not None:
                sock.close()
            transport.stop(0)
            self._release()
            if isinstance(e, ServerError):
                raise
            raise ServerError(f"cannot listen on {self.target}: {e}") from None
        transport.start()
        self._h2 = transport
        log.info("pycri %s serving CRI %s on %s (root %s, state %s)", pycri.__version__,
                 RUNTIME_API_VERSION, self.address, self.runtime.root, self.runtime.state)

    def stop(self, grace: float | None = SHUTDOWN_GRACE) -> None:
        """Stop accepting calls, give running ones ``grace`` seconds, then cancel them."""
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
            self._grpc = None
        if self._h2 is not None:
            self._h2.stop(grace)
            self._h2 = None
        with contextlib.suppress(InvalidStateError):
            self.streaming.stop()
        self._release()
        log.info("pycri CRI server stopped")

    def _release(self) -> None:
        if self.kind == "unix" and self._socket_ino is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(self.target).st_ino == self._socket_ino:
                    os.unlink(self.target)
            self._socket_ino = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


# -- command line --------------------------------------------------------------------------

LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
              "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR,
              "fatal": logging.CRITICAL, "panic": logging.CRITICAL}


def build_parser(prog: str = "python -m pycri.cri") -> argparse.ArgumentParser:
    d = ServerOptions()
    p = argparse.ArgumentParser(prog=prog, description="Serve the Kubernetes CRI v1 API "
                                "(RuntimeService and ImageService) over a pycri Runtime.")
    p.add_argument("--listen", default=d.listen, metavar="ADDRESS",
                   help=f"unix:///PATH, or tcp://127.0.0.1:PORT for tests (default {d.listen})")
    p.add_argument("--root", default=d.root, help=f"persistent state (default {d.root})")
    p.add_argument("--state", default=d.state, help=f"runtime state (default {d.state})")
    p.add_argument("--registry-config-dir", default=None, metavar="DIR",
                   help="registry hosts config: DIR/<host>/hosts.toml, containerd's format")
    p.add_argument("--cni-bin-dir", default=d.cni_bin_dir, metavar="DIR",
                   help=f"CNI plugin binaries (default {d.cni_bin_dir})")
    p.add_argument("--cni-conf-dir", default=d.cni_conf_dir, metavar="DIR",
                   help=f"CNI network configs (default {d.cni_conf_dir})")
    p.add_argument("--sandbox-image", default=d.sandbox_image, metavar="REF",
                   help=f"pause image; reported as pinned (default {d.sandbox_image})")
    p.add_argument("--transport", default=d.transport, choices=("h2", "grpcio"),
                   help="gRPC transport: h2 (pycri's own, over libnghttp2) or grpcio "
                   f"(default {d.transport})")
    p.add_argument("--log-level", default="info", choices=sorted(LOG_LEVELS),
                   help="stderr log level (default info)")
    return p


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("pycri")
    logger.handlers[:] = [handler]
    logger.setLevel(LOG_LEVELS[level])
    logger.propagate = False


def _raise_fd_limit() -> None:
    """A node's runtime holds a few fds per pod and container (connections, slots,
    the creator's start and exit pipes): the soft limit goes up to the hard one, as
    containerd does for itself (a soft 1024 would run out at a few hundred pods)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.debug("open files limit raised from %d to %d", soft, hard)


def main(argv: list[str] | None = None, *, prog: str = "python -m pycri.cri") -> int:
    """Run the server until SIGTERM or SIGINT. Exit status: 0 after a clean stop,
    1 when it cannot start, 2 on bad usage. ``prog`` names the command in --help
    (``pycri serve`` passes its own name)."""
    args = build_parser(prog).parse_args(argv)
    _setup_logging(args.log_level)
    _raise_fd_limit()
    options = ServerOptions(listen=args.listen, root=args.root, state=args.state,
                            registry_config_dir=args.registry_config_dir,
                            cni_bin_dir=args.cni_bin_dir, cni_conf_dir=args.cni_conf_dir,
                            sandbox_image=args.sandbox_image, transport=args.transport)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("got %s: shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        try:
            server = CriServer(options)
            server.start()
        except (ServerError, pycri.PycriError, OSError) as e:
            log.error("cannot start: %s", e)
            return 1
        try:
            while not stop.wait(1.0):
                pass
        finally:
            server.stop(SHUTDOWN_GRACE)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
