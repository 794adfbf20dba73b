"""What the CRI handlers cost inside pycri, without the gRPC transport.

The servicer methods of pycri.cri.server are called directly (no socket, no
grpcio) on a Runtime in temp dirs, with a busybox image from a private
docker-registry; pods have no CNI network. Two tables, medians in microseconds:

  repeated   the same call N times in a row on one object (warm caches): what a
             handler costs at best, e.g. kubelet polling ContainerStatus
  sequence   the calls in critest -benchmark's order, each once per fresh pod or
             container (cold: every call follows different work, as over the wire)

    python3 benchmarks/bench_cri_handlers.py -n 500 --sequence 60
    python3 benchmarks/bench_cri_handlers.py --tree /tmp/old-pycri   # another checkout
                                                                     # (built in place)

Figures depend on the machine's state more than usual at this scale: run it on
a quiet machine, and compare two trees by alternating runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
_p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
_p.add_argument("-n", type=int, default=500, help="calls per repeated handler (default 500)")
_p.add_argument("--sequence", type=int, default=60,
                help="lifecycles for the sequence table (default 60)")
_p.add_argument("--tree", default=os.path.dirname(HERE),
                help="the pycri checkout to measure (default: this one)")
ARGS = _p.parse_args()
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import imagebuild as ib  # noqa: E402
from conftest import LocalRegistry  # noqa: E402

sys.path.insert(0, ARGS.tree)  # (after conftest, which puts this checkout first)
import pycri  # noqa: E402
from pycri.cri import server as srv  # noqa: E402
from pycri.cri._gen import api_pb2 as pb  # noqa: E402


def _pod_config() -> pb.PodSandboxConfig:
    u = str(uuid.uuid4())  # like critest's: metadata only, cgroupfs parent ""
    return pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="p-" + u, uid="u-" + u,
                                                              namespace="ns-" + u),
                               linux=pb.LinuxPodSandboxConfig(cgroup_parent=""))


def _ctr_config(image: str) -> pb.ContainerConfig:
    return pb.ContainerConfig(metadata=pb.ContainerMetadata(name="c-" + uuid.uuid4().hex),
                              image=pb.ImageSpec(image=image), command=["top"],
                              linux=pb.LinuxContainerConfig())


def _median_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1000


def _repeat(call: Callable[[], object], n: int) -> float:
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        call()
        out.append(time.perf_counter_ns() - t)
    return _median_us(out)


def main() -> None:
    base = tempfile.mkdtemp(prefix="pycri-bench-handlers-", dir="/tmp")
    reg = LocalRegistry(os.path.join(base, "reg"))
    rt = pycri.Runtime(root=base + "/root", state=base + "/state",
                       cgroup_parent="pycri-bench-" + uuid.uuid4().hex[:6])
    try:
        ib.push(reg.host, "bench/busybox", "v1", ib.busybox_image())
        image = f"{reg.host}/bench/busybox:v1"
        opts = srv.ServerOptions(listen="unix:///unused", root=rt.root, state=rt.state,
                                 cni_conf_dir="")
        rs, ims = srv.RuntimeService(rt, opts), srv.ImageService(rt, opts)
        ims.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), None)
        spec = pb.ImageSpec(image=image)

        # a few pods with a running container each, and one empty pod
        pods, ctrs = [], []
        for _ in range(5):
            pod = rs.RunPodSandbox(pb.RunPodSandboxRequest(config=_pod_config()), None).pod_sandbox_id
            cid = rs.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=pod, config=_ctr_config(image)), None).container_id
            rs.StartContainer(pb.StartContainerRequest(container_id=cid), None)
            pods.append(pod)
            ctrs.append(cid)
        empty = rs.RunPodSandbox(pb.RunPodSandboxRequest(config=_pod_config()), None).pod_sandbox_id
        n = ARGS.n
        rows = [
            ("Version (no work: the floor)", lambda: rs.Version(pb.VersionRequest(), None)),
            ("ContainerStatus verbose", lambda: rs.ContainerStatus(
                pb.ContainerStatusRequest(container_id=ctrs[0], verbose=True), None)),
            ("ContainerStatus", lambda: rs.ContainerStatus(
                pb.ContainerStatusRequest(container_id=ctrs[0]), None)),
            ("PodSandboxStatus verbose, 1 container", lambda: rs.PodSandboxStatus(
                pb.PodSandboxStatusRequest(pod_sandbox_id=pods[0], verbose=True), None)),
            ("PodSandboxStatus verbose, empty pod", lambda: rs.PodSandboxStatus(
                pb.PodSandboxStatusRequest(pod_sandbox_id=empty, verbose=True), None)),
            ("ImageStatus", lambda: ims.ImageStatus(pb.ImageStatusRequest(image=spec), None)),
            ("ListImages (1 image)", lambda: ims.ListImages(pb.ListImagesRequest(), None)),
            ("ListContainers (5)", lambda: rs.ListContainers(pb.ListContainersRequest(), None)),
            ("ListPodSandbox (6)", lambda: rs.ListPodSandbox(pb.ListPodSandboxRequest(), None)),
        ]
        print(f"pycri from {os.path.dirname(pycri.__file__)}\n\nrepeated (median of {n} calls, us)")
        for name, call in rows:
            print(f"  {name:40s} {_repeat(call, n):8.1f}")

        seq: dict[str, list[int]] = {}

        def timed(name: str, handler: Callable[..., object], request: object) -> object:
            t = time.perf_counter_ns()
            out = handler(request, None)
            seq.setdefault(name, []).append(time.perf_counter_ns() - t)
            return out

        def image_and_create(request: pb.CreateContainerRequest, ctx: None) -> object:
            ims.ImageStatus(pb.ImageStatusRequest(image=spec), ctx)  # critest asks first
            return rs.CreateContainer(request, ctx)

        for _ in range(ARGS.sequence):
            pod = timed("RunPodSandbox", rs.RunPodSandbox,
                        pb.RunPodSandboxRequest(config=_pod_config())).pod_sandbox_id  # type: ignore[attr-defined]
            timed("PodSandboxStatus verbose", rs.PodSandboxStatus,
                  pb.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True))
            cid = timed("ImageStatus + CreateContainer", image_and_create,
                        pb.CreateContainerRequest(pod_sandbox_id=pod, config=_ctr_config(image))
                        ).container_id  # type: ignore[attr-defined]
            timed("StartContainer", rs.StartContainer, pb.StartContainerRequest(container_id=cid))
            timed("ContainerStatus verbose", rs.ContainerStatus,
                  pb.ContainerStatusRequest(container_id=cid, verbose=True))
            timed("StopContainer", rs.StopContainer,
                  pb.StopContainerRequest(container_id=cid, timeout=60))
            timed("RemoveContainer", rs.RemoveContainer, pb.RemoveContainerRequest(container_id=cid))
            rs.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), None)
            rs.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), None)
        print(f"\nsequence (critest's order, median of {ARGS.sequence}, us)")
        for name, samples in seq.items():
            print(f"  {name:40s} {_median_us(samples[2:]):8.1f}")
    finally:
        for sb in rt.sandboxes():
            sb.remove()
        rt.cgroups().remove_parent()
        reg.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
