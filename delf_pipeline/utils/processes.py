"""Worker processes that do not outlive the process that started them."""
from __future__ import annotations

import os
import threading
import time


def exit_with_parent(parent_pid: int, poll_seconds: float = 0.05) -> None:
    """End this process within ``poll_seconds`` once ``parent_pid`` is no longer its parent
    (the parent died, even by kill -9, and the process was re-parented).

    Meant as a worker pool's initializer: a daemon thread polls ``os.getppid()``, which needs
    nothing from the parent and works wherever the pool forks or spawns its workers. A poll is
    one system call: 20 a second cost nothing measurable, and keep the exit well within a
    second on a busy machine (docs/faults.md).
    """
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
