"""What makes a ``bt`` callout cheap: a hook without the binding's layers, EIP read from Unicorn's live CPU
state, and the guest's EFLAGS.TF kept virtual.

Measured on unicorn 2.1.4 (CPython 3.11): a ``syscall`` handed to a Python hook that does nothing costs
0.25 µs; the binding adds two Python frames per call, and ``uc_reg_read`` through ctypes 0.4 µs. A callout
reads EIP once to find its site, so reading it from the live ``CPUX86State`` (located by the machine's
engine calibration, popek.machine.engine) saves that call. The slot's offset is found here the same way the
engine finds its fields: write a marker through the API, look for it; where that fails, the API is used.
"""
from __future__ import annotations

import ctypes
import struct

import unicorn
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uclib

from popek.machine.engine import _pread
from popek.monitors.vcpu import TF, VCpu

_SYSCALL_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_MARKERS = (0x13572468, 0x2468ACE0)


def live_eip(machine):
    """A ctypes view of EIP in Unicorn's live CPU state, or None (then read it through the API).
    Valid inside instruction hooks, where Unicorn has stored EIP (it does, before a syscall's helper)."""
    engine = machine.engine
    lay = engine.layout
    if lay.env_pointer is None:
        return None
    env = ctypes.c_uint64.from_address(engine.uc._uch.value + lay.env_pointer).value + lay.env_delta
    saved = engine.read(X.UC_X86_REG_EIP)
    try:
        found = None
        for marker in _MARKERS:
            engine.write(X.UC_X86_REG_EIP, marker)
            blob = _pread(env, 1024) or b""
            at = blob.find(struct.pack("<Q", marker))
            if at < 0 or (found is not None and at != found):
                return None
            found = at
    finally:
        engine.write(X.UC_X86_REG_EIP, saved)
    return ctypes.c_uint64.from_address(env + found)


def hook_syscall(uc: unicorn.Uc, callback) -> object:
    """``callback()`` on every ``syscall``, registered without the binding's wrappers. An exception it
    raises is handled as the binding does: kept on the Uc, emulation stopped, re-raised by ``emu_start``.
    Returns the ctypes callback, which must be kept alive as long as the hook."""
    def raw(_handle, _user):
        try:
            callback()
        except BaseException as exc:            # noqa: BLE001 - relayed, as the binding relays hook errors
            if uc._hook_exception is None:
                uc._hook_exception = exc
            uc.emu_stop()

    cb = _SYSCALL_CB(raw)
    handle = ctypes.c_size_t()
    status = uclib.uc_hook_add(uc._uch, ctypes.byref(handle), unicorn.UC_HOOK_INSN, cb, None,
                               ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(X.UC_X86_INS_SYSCALL))
    if status != unicorn.UC_ERR_OK:
        raise unicorn.UcError(status)
    return cb


class SteppingVCpu(VCpu):
    """The virtual CPU of bt, whose EFLAGS.TF is virtual."""

    __slots__ = ("stepping",)

    # EFLAGS.TF is virtual under bt: set in the real flags, Unicorn would trap after each instruction of the
    # cache and its glue. ``stepping`` is the guest's TF; the monitor makes the single-step traps itself
    # (BinaryTranslation.next_event and advance). Every guest read and write of EFLAGS goes through these
    # two (pushf, popf, iret, interrupt delivery and its frame, the reported state).
    def eflags(self, real: int) -> int:
        flags = VCpu.eflags(self, real)
        return flags | TF if getattr(self, "stepping", False) else flags

    def set_eflags(self, virtual: int) -> int:
        self.stepping = bool(virtual & TF)
        return VCpu.set_eflags(self, virtual & ~TF)

