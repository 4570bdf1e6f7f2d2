"""``bt``'s view of the shared emulation routines (popek.monitors.emulation): the table its callouts call,
the helpers it uses, and room for entries that replace a shared routine where the bare machine does
something else (none now: the one found so far, smsw into a 32-bit register, is fixed in the shared
routine). Each entry would say what the bare machine does.
"""
from __future__ import annotations

from popek.monitors.emulation import TABLE, decode
from popek.monitors.emulation.access import peek, push
from popek.monitors.emulation.recipe import classifier

__all__ = ["TABLE", "decode", "classifier", "peek", "push", "routine", "OVERRIDES"]

OVERRIDES: dict = {}


def routine(name: str):
    return OVERRIDES.get(name) or TABLE[name]
