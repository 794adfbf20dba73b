"""pycri: a container runtime you import.

    import pycri
    rt = pycri.Runtime()
    img = rt.images.pull("127.0.0.1:5000/library/busybox:latest")
"""

from pycri.config import Auth, Platform
from pycri.errors import *  # the error types are public API
from pycri.errors import __all__ as _errors_all
from pycri.image import FsInfo, Image, ImageStore, PullProgress
from pycri.oci import ImageConfig
from pycri.runtime import Runtime

__version__ = "0.1.0"

__all__ = ["Auth", "Platform", "Runtime", "Image", "ImageStore", "ImageConfig", "FsInfo",
           "PullProgress", "__version__", *_errors_all]
