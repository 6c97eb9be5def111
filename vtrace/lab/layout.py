"""The guest-physical memory map, parameter block and ports shared with the guest programs.

One source of truth: the ``NAME equ VALUE`` lines of ``guest/layout.inc``, which the
assembly sources include, are read here. The virtqueue's own layout is computed by
:func:`vtrace.lab.virtqueue.ring_layout`.
"""

from __future__ import annotations

import re
from pathlib import Path

GUEST_DIR = Path(__file__).with_name("guest")
LAYOUT_INC = GUEST_DIR / "layout.inc"

_EQU = re.compile(r"^\s*([A-Z_][A-Z0-9_]*)\s+equ\s+(0x[0-9a-fA-F]+|\d+)", re.M)


def read_layout(path: Path = LAYOUT_INC) -> dict[str, int]:
    """The ``NAME equ VALUE`` constants of an assembly include file."""
    return {name: int(value, 0) for name, value in _EQU.findall(path.read_text())}


_L = read_layout()

GDT_BASE = _L["GDT_BASE"]
IDT_BASE = _L["IDT_BASE"]
PARAM_BASE = _L["PARAM_BASE"]
PARAM_STRIDE = _L["PARAM_STRIDE"]
QUEUE_BASE = _L["QUEUE_BASE"]
QUEUE_STRIDE = _L["QUEUE_STRIDE"]
STACK_TOP = _L["STACK_TOP"]
STACK_STRIDE = _L["STACK_STRIDE"]
MAX_VCPUS = _L["MAX_VCPUS"]
CODE_BASE = _L["CODE_BASE"]
RING_BASE = _L["RING_BASE"]
CODE_SEL = _L["CODE_SEL"]
DATA_SEL = _L["DATA_SEL"]

P_REQUESTS = _L["P_REQUESTS"]
P_BATCH = _L["P_BATCH"]
P_RING_SIZE = _L["P_RING_SIZE"]
P_REQUEST_BYTES = _L["P_REQUEST_BYTES"]
P_DESC = _L["P_DESC"]
P_AVAIL = _L["P_AVAIL"]
P_USED = _L["P_USED"]
P_DATA = _L["P_DATA"]
P_WAIT_IRQ = _L["P_WAIT_IRQ"]
P_SPIN_LIMIT = _L["P_SPIN_LIMIT"]
P_QUEUE = _L["P_QUEUE"]
P_NOTIFY_PORT = _L["P_NOTIFY_PORT"]
P_QBLOCK = _L["P_QBLOCK"]

R_KICKS = _L["R_KICKS"]
R_SUPPRESSED = _L["R_SUPPRESSED"]
R_COMPLETED = _L["R_COMPLETED"]
R_BAD_USED = _L["R_BAD_USED"]
R_INTERRUPTS = _L["R_INTERRUPTS"]
R_POLLS = _L["R_POLLS"]

PORT_DEV_ADDR = _L["PORT_DEV_ADDR"]
PORT_DEV_LEN = _L["PORT_DEV_LEN"]
PORT_DEV_CMD = _L["PORT_DEV_CMD"]
PORT_DEV_STATUS = _L["PORT_DEV_STATUS"]
PORT_NOTIFY = _L["PORT_NOTIFY"]
NOTIFY_STRIDE = _L["NOTIFY_STRIDE"]
PORT_LOOP = _L["PORT_LOOP"]
PORT_DONE = _L["PORT_DONE"]
PORT_STALL = _L["PORT_STALL"]

DEV_CMD_READ = _L["DEV_CMD_READ"]
DEV_STATUS_DONE = _L["DEV_STATUS_DONE"]

VRING_DESC_F_WRITE = _L["VRING_DESC_F_WRITE"]
VRING_USED_F_NO_NOTIFY = _L["VRING_USED_F_NO_NOTIFY"]
VRING_AVAIL_F_NO_INTERRUPT = _L["VRING_AVAIL_F_NO_INTERRUPT"]

PIC_VECTOR_BASE = _L["PIC_VECTOR_BASE"]
LAB_IRQ = _L["LAB_IRQ"]
