"""The sun4v hyperprivileged model (``monitor``), its API as data (``api``), Logical Domain Channels
(``channels``) and several domains on one chip (``domains``, ``popek domains``)."""
from popek.monitors.sun4v.monitor import Sun4v

__all__ = ["Sun4v"]
