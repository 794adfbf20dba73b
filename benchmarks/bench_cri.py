"""Single CRI RPC latencies over a unix socket: pycri serve beside containerd.

The same sequences critest -benchmark times (pkg/benchmark in cri-tools), made
by one Python gRPC client, so both runtimes pay the same client cost:

  pod        RunPodSandbox, PodSandboxStatus(verbose), StopPodSandbox,
             RemovePodSandbox of a pod like critest's (metadata, no labels,
             cgroup parent "" for cgroupfs)
  container  in a fresh pod each time: ImageStatus + CreateContainer (busybox
             `top`), StartContainer, ContainerStatus(verbose), StopContainer
             (timeout 60), RemoveContainer; the pod is then stopped and removed
  image      PullImage (already present), ImageStatus, RemoveImage
  list       ListImages, and Version (the floor: one RPC that does nothing)

Run inside the peers node (CNI bridge, local registry), one runtime at a time:

  node.sh exec python3 benchmarks/bench_cri.py -n 50 \\
      --endpoint pycri=unix:///run/pycri/pycri.sock \\
      --endpoint containerd=unix:///run/peers-containerd/containerd.sock

Each endpoint that does not answer Version is skipped. Results (p50, p90 in ms;
ratio = first endpoint / second) go to stdout; --json FILE keeps the samples, and
--merge FILE... prints one table from several such files (endpoints measured
in separate runs of the same session).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import grpc  # noqa: E402

from pycri.cri._gen import api_pb2, api_pb2_grpc  # noqa: E402

IMAGE = "registry.k8s.io/e2e-test-images/busybox:1.29-2"
PULL_IMAGE = "registry.k8s.io/e2e-test-images/busybox:1.29-2"


def _pod_config(prefix: str) -> api_pb2.PodSandboxConfig:
    u = str(uuid.uuid4())
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=f"{prefix}-{u}", uid=f"cri-test-uid-{u}",
                                            namespace=f"cri-test-namespace-{u}", attempt=0),
        linux=api_pb2.LinuxPodSandboxConfig(cgroup_parent=""))


class Client:
    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.img = api_pb2_grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()


Sample = dict[str, float]


def _timed(sample: Sample, name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter_ns()
    out = fn()
    sample[name] = sample.get(name, 0.0) + (time.perf_counter_ns() - t0) / 1e6
    return out


def pod_sample(c: Client) -> Sample:
    s: Sample = {}
    cfg = _pod_config("PodSandbox-for-creating-performance-test")
    pid = _timed(s, "RunPodSandbox", lambda: c.rt.RunPodSandbox(
        api_pb2.RunPodSandboxRequest(config=cfg)).pod_sandbox_id)
    _timed(s, "PodSandboxStatus", lambda: c.rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pid, verbose=True)))
    _timed(s, "StopPodSandbox", lambda: c.rt.StopPodSandbox(
        api_pb2.StopPodSandboxRequest(pod_sandbox_id=pid)))
    _timed(s, "RemovePodSandbox", lambda: c.rt.RemovePodSandbox(
        api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pid)))
    s["pod lifecycle"] = sum(s.values())
    return s


def container_sample(c: Client) -> Sample:
    s: Sample = {}
    cfg = _pod_config("create-PodSandbox-for-container")
    pid = c.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
    ccfg = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="Benchmark-container-" + str(uuid.uuid4())),
        image=api_pb2.ImageSpec(image=IMAGE, user_specified_image=IMAGE), command=["top"],
        linux=api_pb2.LinuxContainerConfig())

    def create() -> str:
        c.img.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=IMAGE)))
        return str(c.rt.CreateContainer(api_pb2.CreateContainerRequest(
            pod_sandbox_id=pid, config=ccfg, sandbox_config=cfg)).container_id)

    cid = _timed(s, "CreateContainer", create)
    _timed(s, "StartContainer", lambda: c.rt.StartContainer(
        api_pb2.StartContainerRequest(container_id=cid)))
    _timed(s, "ContainerStatus", lambda: c.rt.ContainerStatus(
        api_pb2.ContainerStatusRequest(container_id=cid, verbose=True)))
    _timed(s, "StopContainer", lambda: c.rt.StopContainer(
        api_pb2.StopContainerRequest(container_id=cid, timeout=60)))
    _timed(s, "RemoveContainer", lambda: c.rt.RemoveContainer(
        api_pb2.RemoveContainerRequest(container_id=cid)))
    s["container lifecycle"] = sum(s.values())
    c.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pid))
    c.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pid))
    return s


def image_sample(c: Client) -> Sample:
    s: Sample = {}
    spec = api_pb2.ImageSpec(image=PULL_IMAGE)
    _timed(s, "PullImage", lambda: c.img.PullImage(api_pb2.PullImageRequest(image=spec)))
    _timed(s, "ImageStatus", lambda: c.img.ImageStatus(api_pb2.ImageStatusRequest(image=spec)))
    _timed(s, "RemoveImage", lambda: c.img.RemoveImage(api_pb2.RemoveImageRequest(image=spec)))
    return s


def list_sample(c: Client) -> Sample:
    s: Sample = {}
    _timed(s, "ListImages", lambda: c.img.ListImages(api_pb2.ListImagesRequest()))
    _timed(s, "Version", lambda: c.rt.Version(api_pb2.VersionRequest()))
    return s


KINDS: dict[str, Callable[[Client], Sample]] = {
    "pod": pod_sample, "container": container_sample, "image": image_sample, "list": list_sample}


def measure(endpoint: str, n: int, kinds: list[str]) -> dict[str, list[float]] | None:
    c = Client(endpoint)
    try:
        c.rt.Version(api_pb2.VersionRequest(), timeout=5)
    except grpc.RpcError as e:
        print(f"# {endpoint}: no answer ({e.code().name}); skipped", file=sys.stderr)
        c.close()
        return None
    out: dict[str, list[float]] = {}
    try:
        # the image the container samples use must be there; the image samples
        # remove it and pull it again
        c.img.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=IMAGE)))
        for kind in kinds:
            for _ in range(3):  # warm-up: connections, caches, first imports
                KINDS[kind](c)
            for _ in range(n):
                for k, v in KINDS[kind](c).items():
                    out.setdefault(k, []).append(v)
        c.img.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=IMAGE)))
    finally:
        c.close()
    return out


def _p(v: list[float], q: float) -> float:
    v = sorted(v)
    k = (len(v) - 1) * q
    f = int(k)
    c = min(f + 1, len(v) - 1)
    return v[f] + (v[c] - v[f]) * (k - f)


def table(results: dict[str, dict[str, list[float]]]) -> None:
    names = list(results)
    ops: list[str] = []
    for r in results.values():
        ops += [k for k in r if k not in ops]
    head = f"{'operation':<22}" + "".join(f"{n + ' p50':>16}{'p90':>8}" for n in names)
    if len(names) >= 2:
        head += f"{names[0] + '/' + names[1]:>22}"
    print(head)
    for op in ops:
        line = f"{op:<22}"
        meds = []
        for n in names:
            v = results[n].get(op)
            if v:
                meds.append(_p(v, 0.5))
                line += f"{_p(v, 0.5):>16.3f}{_p(v, 0.9):>8.3f}"
            else:
                meds.append(float("nan"))
                line += f"{'-':>16}{'-':>8}"
        if len(names) >= 2 and meds[1] and meds[1] == meds[1]:
            line += f"{meds[0] / meds[1]:>22.2f}"
        print(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--endpoint", action="append", default=[], metavar="NAME=unix:///PATH")
    ap.add_argument("-n", type=int, default=50, help="samples per kind (default 50)")
    ap.add_argument("--kinds", default="pod,container,image,list")
    ap.add_argument("--json", metavar="FILE", help="write the samples here")
    ap.add_argument("--merge", nargs="+", metavar="FILE", help="print one table from --json files")
    args = ap.parse_args()
    results: dict[str, dict[str, list[float]]] = {}
    if args.merge:
        for f in args.merge:
            with open(f) as fh:
                results.update(json.load(fh))
    for ep in args.endpoint:
        name, _, addr = ep.partition("=")
        r = measure(addr or name, args.n, args.kinds.split(","))
        if r is not None:
            results[name] = r
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh)
    print(f"# CRI RPC latency, ms, n={args.n} per kind, one Python gRPC client "
          f"(load {os.getloadavg()[0]:.2f})")
    print("# " + " ".join(sys.argv))
    table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
