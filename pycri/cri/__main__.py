"""``python -m pycri.cri``: run the CRI server (see pycri.cri.server)."""

import sys

from pycri.cri.server import main

if __name__ == "__main__":
    sys.exit(main())
