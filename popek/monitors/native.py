"""The bare machine as a monitor: nothing traps, nothing is emulated. The reference for equivalence."""
from __future__ import annotations

from popek.monitors.base import MonitorOps


class Native(MonitorOps):
    name = "native"
