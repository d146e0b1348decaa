"""pof3d: 3D-aware image generation without pose priors (PoF3D), at cluster scale on Ray."""

__version__ = "0.1.0"
