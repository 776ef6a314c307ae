"""Helpers with no tdq dependencies: file I/O (atomic writes, sha256, JSON) and restricted unpickling."""
