"""Training data: Parquet shards, the dataset tool, the known-pose synthetic set and Ray Data streaming.

Modules: :mod:`~pof3d.data.shards` (format, writer, readers), :mod:`~pof3d.data.convert` (folders and
zips), :mod:`~pof3d.data.synthetic` (the generated set and its cache) with
:mod:`~pof3d.data.synthetic_scene` (pose distributions, procedural objects, analytic renderer) and
:mod:`~pof3d.data.streaming` (Ray Data). Ray is imported only by the streaming module.
"""
