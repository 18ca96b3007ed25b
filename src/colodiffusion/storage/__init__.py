"""Storage: what is written to disk and read back, below everything that trains.

Owns sealed folders (write into a temporary folder, fsync, a manifest of sizes and SHA-256 hashes
written last, one atomic rename; recovery after a kill), folders of ours (marked, locked, free of
links: `owned.py`), images decoded as a viewer shows them (`images.py`), the file helpers they need, the named
fault points the kill tests stop at, reading every pickle a checkpoint holds without running code
(`safe_load.py`) and reading any backend's checkpoint as full weights on one process
(`consolidated.py`).

May import: `config` only, and libraries (torch DCP; DeepSpeed lazily, to read its files). The
backends (`parallel/`) and the loop (`train/`) both save through it; the loop's policy (when to
save, which checkpoint to resume from) stays in `train/`.
"""
