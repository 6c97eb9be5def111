"""Tracepoint prototypes from real BTF: this kernel's, and Debian's kvm.ko split on its kernel."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest

from vtrace.collect import btf, program
from vtrace.collect.formats import parse_format
from vtrace.collect.raw_tracepoints import PROTOTYPES, STAT_PROTOTYPES, raw_problem
from vtrace.errors import VtraceError
from vtrace.schema import FORMATS_DIR

HOST_BTF = Path("/sys/kernel/btf/vmlinux")
needs_host_btf = pytest.mark.skipif(
    not HOST_BTF.exists(), reason="no /sys/kernel/btf/vmlinux: kernel built without BTF"
)


def _debian_kernel() -> tuple[Path, Path] | None:
    """Debian's packaged kernel image and its kvm.ko (linux-image-amd64), newest first."""
    for modules in sorted(Path("/lib/modules").glob("*-amd64"), reverse=True):
        kvm = modules / "kernel/arch/x86/kvm/kvm.ko"
        image = Path("/boot") / f"vmlinuz-{modules.name}"
        if kvm.exists() and image.exists():
            return image, kvm
    return None


DEBIAN = _debian_kernel()
needs_debian_kernel = pytest.mark.skipif(
    DEBIAN is None, reason="needs Debian's kernel with kvm.ko: apt-get install linux-image-amd64"
)


def elf_section(data: bytes, name: str) -> bytes:
    """One section of a 64-bit little-endian ELF file."""
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    for sh_name, _type, _flags, _addr, offset, size, *_ in headers:
        end = data.index(b"\0", names_at + sh_name)
        if data[names_at + sh_name : end].decode() == name:
            return data[offset : offset + size]
    raise AssertionError(f"no section {name}")


@pytest.fixture(scope="module")
def debian_btf_dir(tmp_path_factory) -> Path:
    """A /sys/kernel/btf look-alike from Debian's packaged kernel: vmlinux and the kvm module
    (split BTF), the layout of a production host where KVM is a module."""
    image, kvm = DEBIAN
    packed = image.read_bytes()
    start = packed.find(b"\xfd7zXZ\x00")
    if start < 0:
        pytest.skip(f"{image} is not xz-compressed; this test reads only that")
    vmlinux = lzma.LZMADecompressor().decompress(packed[start:])
    out = tmp_path_factory.mktemp("btf")
    (out / "vmlinux").write_bytes(elf_section(vmlinux, ".BTF"))
    (out / "kvm").write_bytes(elf_section(kvm.read_bytes(), ".BTF"))
    return out


@needs_host_btf
def test_this_kernel_has_the_known_prototypes():
    for event, want in {**PROTOTYPES, **STAT_PROTOTYPES}.items():
        got = btf.tracepoint_params(event)
        assert tuple(str(p) for p in got) == want, event
    # kvm_exit's record is computed from the vCPU: its arguments are the vCPU and the ISA.
    assert [str(p) for p in btf.tracepoint_params("kvm_exit")] == ["ptr", "u32"]
    assert "no btf_trace_kvm_nonexistent" in btf.tracepoint_params("kvm_nonexistent")


@needs_debian_kernel
def test_module_split_btf_of_a_packaged_kernel(debian_btf_dir):
    base = btf.Btf((debian_btf_dir / "vmlinux").read_bytes(), "vmlinux")
    assert base.tracepoint_params("kvm_pio") is None  # KVM is a module there
    assert base.tracepoint_params("sys_enter") is not None
    for event, want in {**PROTOTYPES, **STAT_PROTOTYPES}.items():
        got = btf.tracepoint_params(event, btf_dir=debian_btf_dir)
        assert tuple(str(p) for p in got) == want, event
        if event in STAT_PROTOTYPES:  # no static format file: vtrace stat reads the host's
            continue
        fields = parse_format((FORMATS_DIR / f"{event}.format").read_text(), event)
        assert raw_problem(event, fields, debian_btf_dir) is None


def test_corrupt_btf_is_one_line_error(tmp_path):
    with pytest.raises(VtraceError, match=r"not BTF \(magic 0x1234"):
        btf.Btf(struct.pack("<HBBIIIII", 0x1234, 1, 0, 24, 0, 0, 0, 0), "x")
    with pytest.raises(VtraceError, match="truncated BTF"):
        btf.Btf(struct.pack("<HBBIIIII", btf.MAGIC, 1, 0, 24, 0, 100, 100, 10), "y")
    with pytest.raises(VtraceError, match="shorter than its header"):
        btf.Btf(b"\x9f\xeb", "z")
    assert "CONFIG_DEBUG_INFO_BTF" in btf.tracepoint_params("kvm_pio", btf_dir=tmp_path)


@needs_host_btf
def test_unknown_prototype_or_missing_field_means_classic(monkeypatch):
    fields = parse_format((FORMATS_DIR / "kvm_pio.format").read_text(), "kvm_pio")
    assert raw_problem("kvm_pio", fields) is None
    # A kernel whose prototype is not the one the raw handler is written for (kvm_pio had no
    # data pointer before Linux 5.x): the handler is not used.
    monkeypatch.setitem(PROTOTYPES, "kvm_pio", ("u32", "u32", "u32", "u32"))
    why = raw_problem("kvm_pio", fields)
    assert why == "kernel prototype (u32, u32, u32, u32, ptr) is not the known (u32, u32, u32, u32)"
    monkeypatch.undo()
    del fields["val"]
    assert raw_problem("kvm_pio", fields) == "the format file lacks val"
    exit_fields = parse_format((FORMATS_DIR / "kvm_exit.format").read_text(), "kvm_exit")
    assert "computed in the kernel" in raw_problem("kvm_exit", exit_fields)


@needs_host_btf
def test_print_c_has_raw_handlers_and_classic_fallback():
    text = program.print_c(["kvm_pio", "kvm_exit"], [], None)
    assert "#define RAW_MASK 4\n" in text  # kvm_pio (id 2) raw, kvm_exit classic
    classic = program.print_c(["kvm_pio", "kvm_exit"], [], None, classic=True)
    assert "#define RAW_MASK 0\n" in classic
