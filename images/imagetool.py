#!/usr/bin/env python3
"""Helpers for images/build.sh that are easier in Python than in shell. Standard library only.

  imagetool.py vmlinux BZIMAGE OUT            extract the ELF vmlinux from an LZ4 bzImage (lz4 CLI)
  imagetool.py elf-check FILE                 exit 1 unless FILE is an x86_64 ELF executable
  imagetool.py moddeps MODDIR NAME...         modules NAME and their dependencies, load order
  imagetool.py cpio DIR OUT                   deterministic gzip'd newc cpio of DIR
  imagetool.py tree-hash DIR                  reproducible hash of a staged tree (paths, modes, data)
  imagetool.py manifest OUT KEY=VALUE...      write the image manifest (see images/README.md)
  imagetool.py mirror                         the Debian mirror apt uses on this machine
"""

import gzip
import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
import tempfile

LZ4_LEGACY_MAGIC = struct.pack("<I", 0x184C2102)


def elf_info(path):
    """(class, machine, type, number of PT_LOAD headers) of an ELF file, or None."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF":
            return None
        ei_class, ei_data = head[4], head[5]
        if ei_class != 2 or ei_data != 1:
            return (ei_class, None, None, 0)
        e_type, e_machine = struct.unpack_from("<HH", head, 16)
        e_phoff = struct.unpack_from("<Q", head, 32)[0]
        e_phentsize, e_phnum = struct.unpack_from("<HH", head, 54)
        f.seek(e_phoff)
        loads = 0
        for _ in range(e_phnum):
            ph = f.read(e_phentsize)
            if len(ph) == e_phentsize and struct.unpack_from("<I", ph, 0)[0] == 1:
                loads += 1
        return (ei_class, e_machine, e_type, loads)


def is_x86_64_exec(path):
    info = elf_info(path)
    return info is not None and info[0] == 2 and info[1] == 62 and info[2] == 2 and info[3] > 0


def cmd_vmlinux(bzimage, out):
    data = open(bzimage, "rb").read()
    start = 0
    while True:
        pos = data.find(LZ4_LEGACY_MAGIC, start)
        if pos < 0:
            sys.exit(f"imagetool: no LZ4 payload in {bzimage} that decompresses to an x86_64 ELF")
        tmp = out + ".tmp"
        with open(tmp, "wb") as dst:
            # The bzImage carries data after the LZ4 stream (its size, padding), so lz4 reports an
            # error at the end; the decompressed ELF is what counts, and it is checked below.
            subprocess.run(["lz4", "-dc"], input=data[pos:], stdout=dst,
                           stderr=subprocess.DEVNULL, check=False)
        if is_x86_64_exec(tmp):
            os.replace(tmp, out)
            return
        os.unlink(tmp)
        start = pos + 1


def cmd_elf_check(path):
    """An x86_64 ELF program: ET_EXEC, or ET_DYN as static-pie binaries are."""
    info = elf_info(path)
    if info is None or info[:2] != (2, 62) or info[2] not in (2, 3) or info[3] == 0:
        sys.exit(f"imagetool: {path} is not an x86_64 ELF executable: {info}")


def modinfo(path):
    """The .modinfo section of a kernel module as a list of (key, value)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError(f"{path}: not a 64-bit ELF module")
    e_shoff = struct.unpack_from("<Q", data, 40)[0]
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 58)

    def section(i):
        off = e_shoff + i * e_shentsize
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, off)
        return name, offset, size

    _, stroff, _ = section(e_shstrndx)
    for i in range(e_shnum):
        name, offset, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] == b".modinfo":
            fields = data[offset:offset + size].split(b"\0")
            return [tuple(f.decode().split("=", 1)) for f in fields if b"=" in f]
    return []


def cmd_moddeps(moddir, names):
    by_name = {}
    for root, _dirs, files in os.walk(moddir):
        for f in files:
            if f.endswith(".ko"):
                by_name[f[:-3].replace("-", "_")] = os.path.relpath(os.path.join(root, f), moddir)
    order, seen = [], set()

    def visit(name, chain):
        name = name.replace("-", "_")
        if name in seen:
            return
        if name not in by_name:
            sys.exit(f"imagetool: module {name} (needed by {' <- '.join(chain) or 'the image'}) "
                     f"not found under {moddir}")
        seen.add(name)
        deps = [v for k, v in modinfo(os.path.join(moddir, by_name[name])) if k == "depends"]
        for dep in ",".join(deps).split(","):
            if dep:
                visit(dep, [name] + chain)
        order.append(by_name[name])

    for n in names:
        visit(n, [])
    print("\n".join(order))


def walk_sorted(top):
    """Every path under top (relative, sorted, top itself excluded), without following links."""
    out = []
    for root, dirs, files in os.walk(top):
        dirs.sort()
        for name in dirs + files:
            out.append(os.path.relpath(os.path.join(root, name), top))
    return sorted(out)


def cmd_cpio(top, out):
    """newc cpio, uid/gid 0, mtime 0, sorted, inode numbers by position: byte-for-byte stable."""
    chunks = []

    def add(name, mode, data, ino):
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join("%08X" % v for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        chunks.append(hdr.encode() + nb)
        chunks.append(b"\0" * ((4 - (110 + len(nb)) % 4) % 4))
        chunks.append(data)
        chunks.append(b"\0" * ((4 - len(data) % 4) % 4))

    for ino, rel in enumerate(walk_sorted(top), start=1):
        path = os.path.join(top, rel)
        st = os.lstat(path)
        perm = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            add(rel, stat.S_IFLNK | 0o777, os.readlink(path).encode(), ino)
        elif stat.S_ISDIR(st.st_mode):
            add(rel, stat.S_IFDIR | perm, b"", ino)
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                add(rel, stat.S_IFREG | perm, f.read(), ino)
        else:
            sys.exit(f"imagetool: {path}: only files, directories and links go in an initrd")
    add("TRAILER!!!", 0, b"", 0)
    with open(out + ".tmp", "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write(b"".join(chunks))
    os.replace(out + ".tmp", out)


def tree_hash(top):
    """sha256 over sorted lines "<type> <mode> <path> <sha256 of data | link target>".

    Ownership and timestamps are left out so that the hash is the same for every build of the
    same contents (ownership is fixed by the build and checked by the tests instead)."""
    h = hashlib.sha256()
    for rel in walk_sorted(top):
        path = os.path.join(top, rel)
        st = os.lstat(path)
        mode = "%04o" % stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            line = f"l {mode} {rel} {os.readlink(path)}"
        elif stat.S_ISDIR(st.st_mode):
            line = f"d {mode} {rel} -"
        elif stat.S_ISREG(st.st_mode):
            fh = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    fh.update(block)
            line = f"f {mode} {rel} {fh.hexdigest()}"
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
            line = f"{kind} {mode} {rel} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        else:
            line = f"o {mode} {rel} -"
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cmd_manifest(out, pairs):
    """KEY=VALUE pairs; dotted keys nest; values that parse as JSON are stored as JSON."""
    doc = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        try:
            value = json.loads(value)
        except ValueError:
            pass
        node = doc
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(out) or ".", delete=False) as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(f.name, out)
    os.chmod(out, 0o644)


def cmd_mirror():
    """The first Debian mirror in this machine's apt sources (one-line or deb822 format)."""
    files = ["/etc/apt/sources.list"]
    d = "/etc/apt/sources.list.d"
    if os.path.isdir(d):
        files += [os.path.join(d, f) for f in sorted(os.listdir(d))
                  if f.endswith(".list") or f.endswith(".sources")]
    for path in files:
        try:
            text = open(path).read()
        except OSError:
            continue
        if path.endswith(".sources"):
            for stanza in text.split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith("#"):
                        k, v = line.split(":", 1)
                        fields[k.strip().lower()] = v.strip()
                suites = fields.get("suites", "").split()
                if "deb" in fields.get("types", "").split() and any(
                        s in ("bookworm", "stable") for s in suites):
                    print(fields["uris"].split()[0])
                    return
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                words = [w for w in words if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] in ("bookworm", "stable"):
                    print(words[1])
                    return
    sys.exit("imagetool: no bookworm mirror in /etc/apt/sources.list*")


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "vmlinux" and len(args) == 2:
        cmd_vmlinux(*args)
    elif cmd == "elf-check" and len(args) == 1:
        cmd_elf_check(args[0])
    elif cmd == "moddeps" and len(args) >= 2:
        cmd_moddeps(args[0], args[1:])
    elif cmd == "cpio" and len(args) == 2:
        cmd_cpio(*args)
    elif cmd == "tree-hash" and len(args) == 1:
        print(tree_hash(args[0]))
    elif cmd == "sha256" and len(args) == 1:
        print(sha256_file(args[0]))
    elif cmd == "manifest" and len(args) >= 1:
        cmd_manifest(args[0], args[1:])
    elif cmd == "mirror" and not args:
        cmd_mirror()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
