"""The ``hvm`` monitor (VT-x and AMD-V): see ``popek.monitors.hvm.monitor``; its control sets are
``popek.monitors.hvm.controls`` and the data files in ``controls/``."""
from popek.monitors.hvm.monitor import HardwareAssisted

__all__ = ["HardwareAssisted"]
