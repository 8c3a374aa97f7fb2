"""Building modules on the meta device, one thread at a time.

accelerate's ``init_empty_weights`` works by patching ``torch.nn.Module.register_parameter`` for the
whole process while its block runs. Two threads inside it at once undo each other's patch (the first
to leave restores the original while the second is still building: "Cannot copy out of meta tensor"),
which a server with one worker per device does when two workers load models; and a module being
materialised with ``load_state_dict(assign=True)`` while another thread is inside the patch gets its
new parameters moved back to meta. So every meta build in baka goes through :func:`empty_weights`,
which holds one process-wide lock (:data:`META_LOCK`) for the block, and a build that then assigns
its weights holds the same lock around both."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

META_LOCK = threading.RLock()


@contextmanager
def empty_weights() -> Iterator[None]:
    """accelerate's ``init_empty_weights``, serialised across threads."""
    from accelerate import init_empty_weights

    with META_LOCK, init_empty_weights():
        yield


__all__ = ["META_LOCK", "empty_weights"]
