"""Where a VMM's files are by default (``default_control_socket``).

Apart from the plan's parser (config.py): ``osvmm run`` asks it for the run
directory (osvmm/up/locks.py) and needs none of the plan (start-up time).
"""

from __future__ import annotations

import os


def default_control_socket() -> str:
    """``<run dir>/osvmm.sock``; the run directory is one only its user may write
    (osvmm/up/hostfiles.py creates it 0700 and refuses it otherwise):
    /run/osvmm for root, else $XDG_RUNTIME_DIR/osvmm, else /tmp/osvmm-<uid>."""
    uid = os.geteuid()
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if uid == 0:
        run_dir = "/run/osvmm"
    elif os.path.isabs(runtime):
        run_dir = os.path.join(runtime, "osvmm")
    else:
        run_dir = f"/tmp/osvmm-{uid}"
    return os.path.join(run_dir, "osvmm.sock")
