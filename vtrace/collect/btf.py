"""The kernel's BTF type information, read far enough to know a tracepoint's prototype.

A raw tracepoint hands a BPF program the tracepoint's C arguments (its ``TP_PROTO``) instead
of the formatted record described by the format file. Which argument is which is not in the
format file; the kernel describes each tracepoint's prototype in BTF as the typedef
``btf_trace_<event>``: a pointer to a function whose first parameter is the probe's private
data and whose others are the ``TP_PROTO`` arguments. This module reads those typedefs from
``/sys/kernel/btf/vmlinux`` and, where KVM is a module, from its split BTF
(``/sys/kernel/btf/kvm``, whose type ids and strings continue the kernel's).

Only what a prototype needs is decoded: integers, pointers, enums and the modifiers and
typedefs over them. The layout is the kernel's (Documentation/bpf/btf.rst).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from vtrace.errors import VtraceError

BTF_DIR = Path("/sys/kernel/btf")
MAGIC = 0xEB9F

# BTF_KIND_* numbers and the bytes each kind carries after the 12-byte common header:
# a fixed number, or that many per entry of vlen.
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT = 9, 10, 11, 12, 13, 14, 15, 16
DECL_TAG, TYPE_TAG, ENUM64 = 17, 18, 19
_FIXED = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_PER_ENTRY = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
_SEE_THROUGH = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}


@dataclass(frozen=True)
class Param:
    """One argument of a prototype: ``int`` (signed or not), ``bool``, ``ptr`` or ``other``."""

    kind: str
    size: int
    signed: bool = False

    def __str__(self) -> str:
        if self.kind == "int":
            return f"{'s' if self.signed else 'u'}{8 * self.size}"
        return self.kind if self.kind in ("ptr", "bool") else f"{self.kind}{8 * self.size}"


class Btf:
    """One BTF blob (the kernel's, or a module's split on top of ``base``)."""

    def __init__(self, data: bytes, origin: str, base: Btf | None = None) -> None:
        if len(data) < 24:
            raise VtraceError(f"{origin}: not BTF (shorter than its header)")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            "<HBBIIIII", data
        )
        if magic != MAGIC:
            raise VtraceError(f"{origin}: not BTF (magic {magic:#x}, expected {MAGIC:#x})")
        end = hdr_len + max(type_off + type_len, str_off + str_len)
        if end > len(data):
            raise VtraceError(f"{origin}: truncated BTF ({len(data)} bytes, header says {end})")
        self.origin = origin
        self.base = base
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        # Split BTF numbers its types and strings after the base's.
        self._first_id = base._next_id if base else 1
        self._str_base = base._str_end if base else 0
        self._str_end = self._str_base + str_len
        # Per type: (kind, name offset, size_or_type, offset of its extra data in _types).
        self._types = data[hdr_len + type_off : hdr_len + type_off + type_len]
        self._index: list[tuple[int, int, int, int, int]] = []
        self._typedefs: dict[str, int] = {}
        self._scan()
        self._next_id = self._first_id + len(self._index)

    def _scan(self) -> None:
        t, pos, unpack = self._types, 0, struct.unpack_from
        typedef_names: dict[int, int] = {}
        while pos < len(t):
            name_off, info, size_or_type = unpack("<III", t, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            extra = pos + 12
            pos = extra + _FIXED.get(kind, 0) + _PER_ENTRY.get(kind, 0) * vlen
            if kind == TYPEDEF:
                typedef_names[name_off] = self._first_id + len(self._index)
            self._index.append((kind, name_off, size_or_type, extra, vlen))
        if pos != len(t):
            raise VtraceError(f"{self.origin}: BTF type section does not end on a type")
        for off, type_id in typedef_names.items():
            self._typedefs[self.name(off)] = type_id

    def name(self, off: int) -> str:
        if off < self._str_base:
            return self.base.name(off) if self.base else ""
        local = off - self._str_base
        end = self._strings.find(b"\0", local)
        return self._strings[local:end].decode(errors="replace")

    def type(self, type_id: int) -> tuple[int, int, int, int, int]:
        if type_id < self._first_id:
            if self.base is None:
                raise VtraceError(f"{self.origin}: type id {type_id} is in a base BTF not given")
            return self.base.type(type_id)
        try:
            return self._index[type_id - self._first_id]
        except IndexError:
            raise VtraceError(f"{self.origin}: no BTF type id {type_id}") from None

    def typedef(self, name: str) -> int | None:
        found = self._typedefs.get(name)
        if found is None and self.base is not None:
            return self.base.typedef(name)
        return found

    def _blob(self, type_id: int) -> bytes:
        return self._types if type_id >= self._first_id else self.base._blob(type_id)  # type: ignore[union-attr]

    def param(self, type_id: int) -> Param:
        """What an argument of this type is, seen through typedefs and qualifiers."""
        for _ in range(32):  # modifier chains are short; a cycle would be a corrupt blob
            if type_id == 0:
                return Param("void", 0)
            kind, _name, size_or_type, extra, _vlen = self.type(type_id)
            if kind in _SEE_THROUGH:
                type_id = size_or_type
                continue
            if kind == INT:
                (enc,) = struct.unpack_from("<I", self._blob(type_id), extra)
                encoding = enc >> 24
                if encoding & 0x4:  # BTF_INT_BOOL
                    return Param("bool", size_or_type)
                return Param("int", size_or_type, bool(encoding & 0x1))  # BTF_INT_SIGNED
            if kind == PTR:
                return Param("ptr", 8)
            if kind in (ENUM, ENUM64):
                return Param("int", size_or_type, False)
            return Param("other", size_or_type if kind in (STRUCT, UNION, FLOAT) else 0)
        raise VtraceError(f"{self.origin}: type {type_id} is a cycle of typedefs or qualifiers")

    def tracepoint_params(self, event: str) -> tuple[Param, ...] | None:
        """The ``TP_PROTO`` arguments of tracepoint ``event``, or None if this BTF lacks it."""
        type_id = self.typedef(f"btf_trace_{event}")
        if type_id is None:
            return None
        _kind, _name, ptr_id, _extra, _vlen = self.type(type_id)
        kind, _name, proto_id, _extra, _vlen = self.type(ptr_id)
        if kind != PTR:
            raise VtraceError(f"{self.origin}: btf_trace_{event} is not a function pointer")
        kind, _name, _ret, extra, vlen = self.type(proto_id)
        if kind != FUNC_PROTO:
            raise VtraceError(f"{self.origin}: btf_trace_{event} does not point to a prototype")
        blob = self._blob(proto_id)
        params = [struct.unpack_from("<II", blob, extra + 8 * i)[1] for i in range(vlen)]
        # The first parameter is the probe's private data (void *__data), not a TP_PROTO one.
        return tuple(self.param(p) for p in params[1:])


@cache
def kernel_btf(btf_dir: Path = BTF_DIR) -> Btf | None:
    """The running kernel's BTF, or None when it has none (CONFIG_DEBUG_INFO_BTF off)."""
    try:
        data = (btf_dir / "vmlinux").read_bytes()
    except OSError:
        return None
    return Btf(data, str(btf_dir / "vmlinux"))


def tracepoint_params(
    event: str, modules: tuple[str, ...] = ("kvm",), btf_dir: Path = BTF_DIR
) -> tuple[Param, ...] | str:
    """``event``'s prototype from the kernel's BTF or a module's, or why it is not known."""
    base = kernel_btf(btf_dir)
    if base is None:
        return f"no {btf_dir}/vmlinux (kernel without CONFIG_DEBUG_INFO_BTF)"
    found = base.tracepoint_params(event)
    if found is not None:
        return found
    for module in modules:
        split = _module_btf(btf_dir, module)
        if split is not None and (found := split.tracepoint_params(event)) is not None:
            return found
    return f"no btf_trace_{event} in the BTF of the kernel or of {', '.join(modules)}"


@cache
def _module_btf(btf_dir: Path, module: str) -> Btf | None:
    try:
        data = (btf_dir / module).read_bytes()
    except OSError:
        return None
    base = kernel_btf(btf_dir)
    return Btf(data, str(btf_dir / module), base=base)
