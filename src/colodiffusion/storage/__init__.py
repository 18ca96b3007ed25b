"""Storage: what is written to disk and read back, below everything that trains.

Owns sealed folders (write into a temporary folder, fsync, a manifest of sizes and SHA-256 hashes
written last, one atomic rename; recovery after a kill), the file helpers they need, the named
fault points the kill tests stop at, and reading state files without running code.

May import: `config` only. The backends (`parallel/`) and the loop (`train/`) both save through it;
the loop's policy (when to save, which checkpoint to resume from) stays in `train/`.
"""
