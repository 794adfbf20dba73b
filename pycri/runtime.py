"""Runtime: the entry object. One per (root, state) pair; many may coexist.

    rt = pycri.Runtime()                       # /var/lib/pycri and /run/pycri
    rt = pycri.Runtime(root=..., state=...)    # anywhere else

Everything a Runtime knows is on disk under root and state, so a new Runtime
on the same directories (in this process or another) sees the same images.
"""

from __future__ import annotations

import os

from pycri import store
from pycri.config import Platform
from pycri.errors import UnsupportedError
from pycri.image import ImageStore

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

    def __repr__(self) -> str:
        return f"Runtime(root={self.root!r}, state={self.state!r})"
