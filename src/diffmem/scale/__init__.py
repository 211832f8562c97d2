"""Scans of large prompt logs and index builds of large image sets, locally or on Ray, resumable.

- :func:`diffmem.scale.scan.scan`: ``diffmem scan`` (docs/scan.md).
- :func:`diffmem.scale.index_build.build_index_sharded`: ``diffmem index build --engine ray``.
"""
