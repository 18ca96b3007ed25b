"""`colodiffusion` with a real file-size limit (RLIMIT_FSIZE) on the ranks named by LIMIT_RANKS
(comma-separated; all ranks when unset), so that writes past LIMIT_BYTES fail with EFBIG as on a
full disk. SIGXFSZ is ignored, so the write returns the error instead of killing the process."""

import os
import resource
import signal
import sys

rank = os.environ.get("RANK", "0")
if "parallel.strategy=deepspeed" in sys.argv:
    # DeepSpeed on a CPU JIT-builds its shared-memory op when it starts, into ~/.cache/torch_extensions; its
    # object files are larger than the limit, so where no earlier run built it (a fresh CI machine, or this
    # test scheduled before the other DeepSpeed tests) the compiler, not the checkpoint write, hit the limit.
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()
if rank in os.environ.get("LIMIT_RANKS", rank).split(","):
    limit = int(os.environ["LIMIT_BYTES"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

from colodiffusion.cli import main  # noqa: E402

main(sys.argv[1:])
