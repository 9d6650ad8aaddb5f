"""tests/ddp_worker.py, but on torchrun's first attempt rank 1 kills itself with SIGKILL in
the middle of a training epoch (at its forward pass number KILL_AT_STEP), as a crashed
machine would; torchrun --max-restarts then starts the group again.

Usage: torchrun ... tests/ddp_restart_worker.py KILL_AT_STEP RECORD_DIR ARGS...
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import ddp_worker  # noqa: E402

if __name__ == "__main__":
    kill_at = int(sys.argv.pop(1))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and os.environ["RANK"] == "1":
        from eanet.train.augmentation import BatchAugment

        real = BatchAugment.__call__
        calls = {"n": 0}

        def forward_train(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        BatchAugment.__call__ = forward_train
    sys.exit(ddp_worker.run())
