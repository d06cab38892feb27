"""Files: the write-ahead log, snapshots, node metadata. Synchronous; the runtime decides
which calls run in a worker thread."""
