"""The embedded engine: a Qdrant Edge shard owned by a worker process, reached over a Unix socket.

Qdrant Edge's Python bindings hold the GIL for the whole of every call (a search, a flush, and the tens of
seconds of an HNSW build), so the shard lives in its own process (`engine`) and the server talks to it with
small msgpack frames (`protocol`, `client`). Graph builds run in a third process on a consistent copy of the
shard (`build`) and are swapped in when done, so neither searches nor writes wait for them.
"""
