# cffi cannot declare its extension in pyproject.toml alone; this is the whole of setup.py.
from setuptools import setup

setup(cffi_modules=["csrc/build.py:ffibuilder"])
