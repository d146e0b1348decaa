"""pof3d: 3D-aware image generation without pose priors (PoF3D), at cluster scale on Ray.

"The official code" in this package's comments is the authors' implementation of PoF3D,
https://github.com/VivianSZF/pof3d (built on NVIDIA's EG3D); docs/fidelity.md compares the two item by
item, at the commit it names.
"""

__version__ = "0.1.0"
