"""A micro model (32 px, a few thousand parameters) for end-to-end Ray tests that must finish fast, and
for benchmarks/launch.py, which times what such a short run costs around its steps.

Its workers train on one thread (``train.cpu_threads=1``): the end-to-end tests run several trainers,
Ray nodes, data tasks or servers on one machine at once, and a trainer whose OpenMP threads outnumber
the free cores waits at each of the step's thousands of parallel regions for a descheduled thread. On a
2-core machine (``python benchmarks/threads.py`` with these settings, 2026-12-07) a micro step takes
0.119 s on one thread and 0.137 s on two when it runs alone, and with two trainers at once 0.128 s on
one thread each against 1.19 s on two each.
"""

MICRO = [
    "model.image_resolution=32",
    "data.resolution=32",
    "data.synthetic_n=64",
    "model.neural_resolution=16",
    "model.triplane_resolution=16",
    "model.triplane_channels=8",
    "model.channel_base=256",
    "model.channel_max=32",
    "model.disc_channel_base=256",
    "model.disc_channel_max=32",
    "model.depth_samples=6",
    "model.importance_samples=6",
    "model.sr_channels=16",
    "model.z_dim=32",
    "model.w_dim=32",
    "model.cmap_dim=32",
    "model.pose_hidden=32",
    "model.decoder_hidden=16",
    "model.decoder_features=8",
    "train.tick_kimg=0.004",
    "train.snapshot_kimg=0.008",
    "train.cpu_threads=1",
]
