# cffi cannot declare its extension in pyproject.toml alone, hence setup.py. build_ext
# also builds the executables (the per-container monitor, the pod pid-namespace
# holder) into pycri/: static-pie when the toolchain can (smallest PSS, no loader),
# else a plain dynamic executable. The monitor is also pycri_launch's launcher
# (--launch), so the spawn code is linked into it as well.
import os
import shlex
import subprocess
import sysconfig

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
# executable -> its sources; each is built static-pie when the toolchain can
EXECUTABLES = {
    "pycri-monitor": ["csrc/main_monitor.c", "csrc/launch.c", "csrc/specbuf.c", "csrc/spawn.c",
                      "csrc/spawn_child.c",
                      "csrc/mount.c", "csrc/userns.c", "csrc/error.c"],
    "pycri-pause": ["csrc/main_pause.c"],
}
MONITOR_FLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                 "-D_GNU_SOURCE", "-Icsrc"]


class BuildExtWithMonitor(build_ext):
    def run(self) -> None:
        super().run()
        base = HERE if self.inplace else self.build_lib
        for name, sources in EXECUTABLES.items():
            self._executable(os.path.join(base, "pycri", name), sources)

    def _executable(self, out: str, sources: list[str]) -> None:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
        srcs = [os.path.join(HERE, s) for s in sources]
        tmp = out + ".tmp"
        for link in (["-static-pie"], []):
            cmd = [*cc, *MONITOR_FLAGS, "-I" + os.path.join(HERE, "csrc"), *srcs, *link,
                   "-o", tmp]
            if subprocess.run(cmd, check=False, cwd=HERE).returncode == 0:
                break
        else:
            raise RuntimeError(f"building {os.path.basename(out)} failed: " + " ".join(cmd))
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)


setup(cffi_modules=["csrc/build.py:ffibuilder"], cmdclass={"build_ext": BuildExtWithMonitor})
