"""``python sweeps/ablation.py``: the study command (``pof3d-sweep``) run as a script from a checkout.

The command lives in :mod:`pof3d.studies.cli`; install the package (``pip install -e .``) first.
"""

import sys

from pof3d.studies.cli import main

if __name__ == "__main__":
    sys.exit(main())
