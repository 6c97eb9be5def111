"""Build the initramfs of the QEMU guest from the host's own files.

The guest is the distribution's kernel (Debian's ``linux-image-amd64``) with a tiny root
file system: a static busybox, the device's driver modules (resolved from ``modules.dep``
and listed in dependency order, decompressed where they ship as ``.ko.xz`` / ``.ko.gz``)
and the guest's ``init`` script. Nothing is downloaded. The archive is an uncompressed
``newc`` cpio (the kernel unpacks it without a decompressor, which is cheaper under TCG),
cached under ``~/.cache/vtrace/initramfs`` keyed by kernel, device and content.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vtrace.errors import VtraceError

BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")
BOOT_DIR = Path("/boot")
MODULES_ROOT = Path("/lib/modules")

# Driver modules each guest device needs, by module name; their dependencies come from
# modules.dep. For IDE, sd_mod pulls in t10-pi whose CRC libraries look up a crypto
# provider at load time: the generic providers are loaded first so they find one.
DEVICE_MODULES: dict[str, tuple[str, ...]] = {
    "ide": ("crct10dif_generic", "crc64_rocksoft_generic", "ata_piix", "sd_mod"),
    "virtio-blk": ("virtio_pci", "virtio_blk"),
    "e1000": ("e1000",),
    "virtio-net": ("virtio_pci", "virtio_net"),
}
_MODULE_SUFFIX = re.compile(r"\.ko(\.xz|\.gz|\.zst)?$")


@dataclass(frozen=True)
class GuestKernel:
    """A kernel image and its module tree, the guest's kernel."""

    version: str
    image: Path
    modules_dir: Path


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version))


def find_kernel(image: str | os.PathLike[str] | None = None) -> GuestKernel:
    """The guest kernel: ``image`` if given, else the newest ``/boot/vmlinuz-*`` with modules."""
    if image is not None:
        path = Path(image)
        if not path.is_file():
            raise VtraceError(f"{path}: no such kernel image (apt-get install linux-image-amd64)")
        version = path.name.removeprefix("vmlinuz-")
        modules_dir = MODULES_ROOT / version
        if not (modules_dir / "modules.dep").is_file():
            raise VtraceError(
                f"{modules_dir / 'modules.dep'}: no module tree for kernel {path.name} "
                "(install the kernel package that ships it, e.g. linux-image-amd64)"
            )
        return GuestKernel(version, path, modules_dir)
    candidates = [
        GuestKernel(p.name.removeprefix("vmlinuz-"), p, MODULES_ROOT / p.name[len("vmlinuz-") :])
        for p in BOOT_DIR.glob("vmlinuz-*")
    ]
    candidates = [k for k in candidates if (k.modules_dir / "modules.dep").is_file()]
    if not candidates:
        raise VtraceError(
            f"no guest kernel: {BOOT_DIR}/vmlinuz-* with /lib/modules/<version>/modules.dep "
            "not found (apt-get install linux-image-amd64)"
        )
    return max(candidates, key=lambda k: _version_key(k.version))


def find_busybox() -> Path:
    """A statically linked busybox (the guest has no libc of its own)."""
    for candidate in BUSYBOX_PATHS:
        path = Path(candidate)
        if path.is_file() and not _has_interpreter(path):
            return path
    raise VtraceError("no static busybox at /bin/busybox (apt-get install busybox-static)")


def _has_interpreter(path: Path) -> bool:
    """True when the ELF64 file names a program interpreter (PT_INTERP): dynamically linked."""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return True  # not an ELF64 executable: unusable as the guest's busybox
        phoff = int.from_bytes(head[0x20:0x28], "little")
        phentsize = int.from_bytes(head[0x36:0x38], "little")
        phnum = int.from_bytes(head[0x38:0x3A], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return any(
        int.from_bytes(table[i : i + 4], "little") == pt_interp
        for i in range(0, len(table), phentsize)
    )


def _module_name(rel_path: str) -> str:
    return _MODULE_SUFFIX.sub("", rel_path.rsplit("/", 1)[-1]).replace("-", "_")


def read_modules_dep(modules_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """``modules.dep`` as name -> (relative path, dependency names)."""
    dep_file = modules_dir / "modules.dep"
    table: dict[str, tuple[str, list[str]]] = {}
    for lineno, line in enumerate(dep_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        path, sep, deps = line.partition(":")
        if not sep:
            raise VtraceError(f"{dep_file}:{lineno}: expected 'module: deps', got {line!r}")
        table[_module_name(path)] = (path, [_module_name(d) for d in deps.split()])
    return table


def resolve_modules(modules_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Relative paths of ``names`` and everything they depend on, dependencies first."""
    table = read_modules_dep(modules_dir)
    ordered: list[str] = []
    state: dict[str, bool] = {}  # False: being visited, True: done

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if state.get(key) is True:
            return
        if state.get(key) is False:
            raise VtraceError(f"{modules_dir / 'modules.dep'}: dependency cycle at {key}")
        if key not in table:
            raise VtraceError(
                f"{modules_dir / 'modules.dep'}: no module {key} (is it built into this kernel "
                "or missing from its package?)"
            )
        state[key] = False
        path, deps = table[key]
        for dep in deps:
            visit(dep)
        state[key] = True
        ordered.append(path)

    for name in names:
        visit(name)
    return ordered


def module_bytes(path: Path) -> bytes:
    """The module as busybox ``insmod`` needs it: an uncompressed ELF object."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        if shutil.which("zstd") is None:
            raise VtraceError(f"{path}: zstd-compressed module needs zstd (apt-get install zstd)")
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return data


class _Cpio:
    """A ``newc`` cpio archive written in memory (the format the kernel unpacks)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self._ino += 1
        pad_name = -(len(header) + len(encoded)) % 4
        self._chunks += [header, encoded, b"\0" * pad_name, data, b"\0" * (-len(data) % 4)]

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        out = b"".join(self._chunks)
        return out + b"\0" * (-len(out) % 512)


def init_script() -> bytes:
    """The guest's ``/init`` (shipped as package data next to this module)."""
    return resources.files("vtrace.lab").joinpath("guest_init.sh").read_bytes()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vtrace" / "initramfs"


def build_initramfs(kernel: GuestKernel, device: str, *, use_cache: bool = True) -> Path:
    """The cpio for ``device``'s guest, built once and cached; returns its path."""
    if device not in DEVICE_MODULES:
        raise VtraceError(f"unknown device {device!r}: one of {', '.join(DEVICE_MODULES)}")
    busybox = find_busybox()
    rel_paths = resolve_modules(kernel.modules_dir, DEVICE_MODULES[device])
    script = init_script()
    key = hashlib.sha256()
    for part in (kernel.version, device, *rel_paths):
        key.update(part.encode() + b"\0")
    key.update(script)
    bb_stat = busybox.stat()
    key.update(f"{bb_stat.st_size}:{bb_stat.st_mtime_ns}".encode())
    for rel in rel_paths:
        key.update(str((kernel.modules_dir / rel).stat().st_mtime_ns).encode())
    target = cache_dir() / f"{kernel.version}-{device}-{key.hexdigest()[:16]}.cpio"
    if use_cache and target.is_file():
        return target

    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "etc/vtrace", "lib", "lib/modules"):
        cpio.directory(d)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", script, 0o755)
    names = []
    for rel in rel_paths:
        name = _MODULE_SUFFIX.sub("", rel.rsplit("/", 1)[-1]) + ".ko"
        cpio.file(f"lib/modules/{name}", module_bytes(kernel.modules_dir / rel))
        names.append(name)
    cpio.file("etc/vtrace/modules", ("\n".join(names) + "\n").encode())
    data = cpio.finish()

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)  # concurrent builders race harmlessly: same content
    return target
