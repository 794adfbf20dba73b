"""pycri: a container runtime you import.

    import pycri
    rt = pycri.Runtime()
    img = rt.images.pull("127.0.0.1:5000/library/busybox:latest")
"""

from pycri.config import (
    Auth,
    ContainerConfig,
    DeviceRule,
    DNSConfig,
    IDMapping,
    Mount,
    Platform,
    PortMapping,
    Resources,
    SandboxConfig,
    UserNamespace,
)
from pycri.errors import *  # the error types are public API
from pycri.errors import __all__ as _errors_all
from pycri.image import FsInfo, Image, ImageStore, PullProgress
from pycri.oci import ImageConfig
from pycri.container import Container, ContainerStats, ContainerStatus, ExecResult, RunResult
from pycri.runtime import Runtime
from pycri.sandbox import Sandbox, SandboxStatus

__version__ = "0.1.0"

__all__ = ["Auth", "Platform", "Runtime", "Sandbox", "SandboxStatus", "SandboxConfig",
           "ContainerConfig", "Mount", "Resources", "DeviceRule", "DNSConfig", "PortMapping",
           "IDMapping", "UserNamespace", "Container", "ContainerStatus", "ContainerStats",
           "ExecResult", "RunResult", "Image", "ImageStore", "ImageConfig", "FsInfo",
           "PullProgress", "__version__", *_errors_all]
