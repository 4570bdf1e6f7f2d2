"""What a deprivileging monitor derives from the guest's own structures and owns in monitor memory:
``tables`` (the real GDT, LDT, IDT and TSS) and ``paging`` (the real page directory). ``trap``, ``bt`` and
``pv`` use both (``Shadow``); a monitor whose guest keeps its own descriptor tables (``hvm`` without nested
paging) uses ``ShadowPaging`` alone.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from popek.monitors.shadow.paging import ShadowPaging
from popek.monitors.shadow.tables import LDT_SELECTOR, TABLE_SIZE, TSS_SELECTOR, ShadowTables, compress

if TYPE_CHECKING:
    from popek.machine.machine import Machine
    from popek.monitors.vcpu import VCpu


class Shadow(ShadowTables):
    """The real tables and the real paging, both following one virtual CPU."""

    def __init__(self, machine: Machine, vcpu: VCpu):
        super().__init__(machine, vcpu)
        self.paging = ShadowPaging(machine, vcpu)       # allocated after the tables, as the guest sees them

    @property
    def pt(self) -> int:
        return self.paging.pt

    def paging_changed(self) -> bool:
        return self.paging.paging_changed()


__all__ = ["Shadow", "ShadowTables", "ShadowPaging", "compress", "TABLE_SIZE", "TSS_SELECTOR", "LDT_SELECTOR"]
