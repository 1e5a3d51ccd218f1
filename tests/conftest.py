"""Suite-wide settings.

``make test`` runs the suite on 2 pytest-xdist workers (``--dist loadgroup``). Tests spread freely over both,
Ray tests included: two local Ray instances side by side work (each ``ray.init`` starts its own, and a
``ray start`` cluster records its address in its own temp dir, so no plain ``ray.init`` joins it). The tests
that start 2-node loopback clusters with ``ray start`` share the ``loopback-cluster`` group and run one after
another on one worker.

Each xdist worker runs torch on one intra-op thread: two workers with a thread per core each oversubscribe the
cores, and OpenMP's spinning threads then made the fast tests 4x slower (10:52 instead of 2:54 on 2 cores).
"""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: also for the tests' subprocesses
    import torch

    torch.set_num_threads(1)
