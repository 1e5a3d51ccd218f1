"""Sharded image data: Parquet shards through fsspec, converters, streaming readers, splits."""
