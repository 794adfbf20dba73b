"""Runtime: the entry object. One per (root, state) pair; many may coexist.

    rt = pycri.Runtime()                       # /var/lib/pycri and /run/pycri
    rt = pycri.Runtime(root=..., state=...)    # anywhere else

Everything a Runtime knows is on disk under root and state, so a new Runtime
on the same directories (in this process or another) sees the same images.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pycri import store
from pycri.config import Platform
from pycri.errors import UnsupportedError
import contextlib

from pycri import container, sandbox, slots
from pycri.container import Container
from pycri.cgroup import CgroupManager, Hierarchy
from pycri.config import SandboxConfig, validate_cgroup_parent
from pycri.errors import InvalidArgumentError, NotFoundError
from pycri.image import ImageStore
from pycri.network import DEFAULT_BIN_DIRS, CNI
from pycri.sandbox import Sandbox

_HEX = re.compile(r"[0-9a-f]+")
DEFAULT_ROOT = "/var/lib/pycri"
DEFAULT_STATE = "/run/pycri"


class Runtime:
    """Owns the image store (and, with the runtime layer, sandboxes and containers)."""

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        state: str = DEFAULT_STATE,
        *,
        registry_config_dir: str | None = None,
        docker_config: str | None = None,
        insecure_registries: tuple[str, ...] = (),
        platform: Platform | None = None,
        cgroup_parent: str = "pycri",
        cni_conf_dir: str | None = None,
        cni_bin_dirs: tuple[str, ...] = DEFAULT_BIN_DIRS,
    ) -> None:
        self.root = os.path.abspath(root)
        self.state = os.path.abspath(state)
        # root is traversable (0711) so unprivileged container users can reach
        # overlay lower dirs; state holds sockets and pids and stays 0700.
        store.makedirs(self.root, 0o711)
        os.chmod(self.root, 0o711)
        store.makedirs(self.state, 0o700)
        os.chmod(self.state, 0o700)
        version_file = os.path.join(self.root, "VERSION")
        try:
            with open(version_file) as f:
                found = f.read().strip()
        except FileNotFoundError:
            store.atomic_write(version_file, store.LAYOUT_VERSION.encode() + b"\n", mode=0o644)
            found = store.LAYOUT_VERSION
        if found != store.LAYOUT_VERSION:
            raise UnsupportedError(
                f"{self.root} holds pycri layout version {found!r}; this pycri reads "
                f"version {store.LAYOUT_VERSION!r}")
        self.images = ImageStore(
            self.root,
            registry_config_dir=registry_config_dir,
            docker_config=docker_config,
            platform=platform,
            insecure_registries=insecure_registries,
        )
        self.cgroup_parent = validate_cgroup_parent(cgroup_parent)
        # Pods get CNI networking when a CNI conf dir is given; otherwise a pod's
        # network namespace has loopback only (the library default).
        self.cni: CNI | None = CNI(cni_conf_dir, cni_bin_dirs) if cni_conf_dir else None
        self._hierarchy: Hierarchy | None = None
        store.makedirs(os.path.join(self.root, "locks"))
        # traversable: containers' writable layers and rootfs mount points, and the
        # files user-namespaced pods mount, live below (each record dir is 0700 itself)
        for d in ("sandboxes", "containers"):
            store.makedirs(os.path.join(self.root, d), 0o711)
            os.chmod(os.path.join(self.root, d), 0o711)
        for d in ("sandboxes", "containers", "sockets"):
            store.makedirs(os.path.join(self.state, d))
        self.mount_points = slots.mount_points_layer(self.root)
        self.images.layer_roots = self._layers_in_use
        # sandbox and container records as parsed, reused while a file's bytes stay
        self.parsed = store.ParsedFiles(limit=1024)
        self._pod_of: dict[str, str] = {}  # container id -> its sandbox id
        # removed containers' and pods' trees are renamed here and deleted in the
        # background (and leftovers of a killed process now)
        self.trash = store.Trash(self.root)
        self.state_trash = store.Trash(self.state)
        sandbox.recover(self)
        container.recover(self)
        slots.cleanup(self)
        store.sweep_lock_files(self.root)

    # -- cgroups -------------------------------------------------------------------

    def cgroups(self, parent: str | None = None) -> CgroupManager:
        """The cgroup manager for pods under ``parent`` (default: the Runtime's)."""
        if self._hierarchy is None:
            self._hierarchy = Hierarchy.detect()
        return CgroupManager(parent or self.cgroup_parent, self._hierarchy)

    # -- sandboxes -------------------------------------------------------------------

    def run_sandbox(self, config: SandboxConfig) -> Sandbox:
        """Create a pod and make it ready: namespaces, cgroup, network, DNS, hostname."""
        return Sandbox.create(self, config)

    def sandboxes(self, state: str | None = None,
                  labels: dict[str, str] | None = None) -> list[Sandbox]:
        """Every sandbox on this root (optionally only those in ``state`` with ``labels``)."""
        out = []
        for sid in sorted(os.listdir(os.path.join(self.root, "sandboxes"))):
            sb = Sandbox(self, sid)
            if state or labels:
                try:
                    rec = sb.record()
                except NotFoundError:
                    continue
                if not _matches(rec, state, labels):
                    continue
            out.append(sb)
        return out

    # -- containers ------------------------------------------------------------------

    def containers(self, sandbox_id: str | None = None, state: str | None = None,
                   labels: dict[str, str] | None = None,
                   container_id: str | None = None) -> list[Container]:
        """Containers on this root, filtered by sandbox, state, labels or id prefix."""
        out = []
        names = sorted(os.listdir(os.path.join(self.root, "containers")))
        pod_of = self._pod_of
        for cid in names:
            if container_id and not cid.startswith(container_id):
                continue
            c = Container(self, cid)
            if sandbox_id or state or labels:
                # A container's pod never changes (and ids are never reused): once
                # read, it is known without opening the record again.
                known = pod_of.get(cid)
                if sandbox_id and known is not None and known != sandbox_id:
                    continue
                try:
                    rec = c.record() if state else \
                        c._parsed().rec if labels or known is None else None
                except NotFoundError:
                    continue
                if rec is not None:
                    pod_of[cid] = rec["sandbox_id"]
                    if sandbox_id and rec["sandbox_id"] != sandbox_id:
                        continue
                    if not _matches(rec, state, labels):
                        continue
            out.append(c)
        if len(pod_of) > len(names):  # forget removed containers
            self._pod_of = {cid: pod_of[cid] for cid in names if cid in pod_of}
        return out

    def container(self, container_id: str) -> Container:
        """The container with this id or unique id prefix."""
        return Container(self, _find_id(os.path.join(self.root, "containers"), container_id,
                                        "container"))

    def _layers_in_use(self) -> set[str]:
        """Layer dirs (chain ids) that containers' root filesystems are built from."""
        used: set[str] = set()
        for c in self.containers():
            with contextlib.suppress(NotFoundError, KeyError, ValueError, OSError):
                used.update(c._read().get("layers", []))
        return used

    def sandbox(self, sandbox_id: str) -> Sandbox:
        """The sandbox with this id or unique id prefix."""
        return Sandbox(self, _find_id(os.path.join(self.root, "sandboxes"), sandbox_id, "sandbox"))

    def __repr__(self) -> str:
        return f"Runtime(root={self.root!r}, state={self.state!r})"


def _matches(rec: dict[str, Any], state: str | None, labels: dict[str, str] | None) -> bool:
    """Whether a record is in ``state`` (if given) and has every label in ``labels``."""
    if state and rec["state"] != state:
        return False
    have = rec["config"].get("labels", {})
    return not labels or all(have.get(k) == v for k, v in labels.items())


def _find_id(directory: str, wanted: str, what: str) -> str:
    if not isinstance(wanted, str) or not _HEX.fullmatch(wanted):
        raise NotFoundError(f"{what} {wanted!r} not found")
    if os.path.isdir(os.path.join(directory, wanted)):
        return wanted
    hits = [n for n in os.listdir(directory) if n.startswith(wanted)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise InvalidArgumentError(f"{what} id prefix {wanted!r} is ambiguous")
    raise NotFoundError(f"{what} {wanted!r} not found")
