#!/usr/bin/env python3
"""Wrap the test guest's flat image in a minimal Linux bzImage.

usage: mkbzimage.py GUEST.elf GUEST.bin OUT.bzImage

GUEST.bin is `objcopy -O binary GUEST.elf`, i.e. the image from 0x100000 up. The
result is a 512-byte boot sector plus 4 setup sectors holding only the setup header
(no real-mode code: it is meant for loaders that use the 64-bit entry, payload
offset 0x200), followed by the flat image as the protected-mode payload.
"""

import struct
import sys

LOAD_ADDR = 0x100000
ENTRY_64 = LOAD_ADDR + 0x200
SETUP_SECTS = 4
SETUP_LEN = (SETUP_SECTS + 1) * 512


def elf_layout(elf):
    """Returns (entry, lowest PT_LOAD address, end of the highest PT_LOAD in memory)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        sys.exit("not a little-endian ELF64 file")
    (entry, phoff) = struct.unpack_from("<QQ", elf, 0x18)
    (phentsize, phnum) = struct.unpack_from("<HH", elf, 0x36)
    start, end = None, 0
    for i in range(phnum):
        p_type, _, _, _, paddr, _, memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", elf, phoff + i * phentsize
        )
        if p_type == 1 and memsz:  # PT_LOAD
            start = paddr if start is None else min(start, paddr)
            end = max(end, paddr + memsz)
    if start is None:
        sys.exit("ELF has no PT_LOAD segments")
    return entry, start, end


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    elf_path, bin_path, out_path = sys.argv[1:]
    with open(elf_path, "rb") as f:
        elf = f.read()
    with open(bin_path, "rb") as f:
        payload = f.read()

    entry, start, end = elf_layout(elf)
    if start != LOAD_ADDR or entry != ENTRY_64:
        sys.exit(f"ELF must load at {LOAD_ADDR:#x} with entry {ENTRY_64:#x}, "
                 f"got {start:#x} / {entry:#x}")
    if len(payload) > end - start:
        sys.exit("flat binary is larger than the ELF's memory image")
    init_size = (end - LOAD_ADDR + 0xFFF) & ~0xFFF

    setup = bytearray(SETUP_LEN)

    def put(fmt, off, value):
        struct.pack_into("<" + fmt, setup, off, value)

    put("B", 0x1F1, SETUP_SECTS)                  # setup_sects
    put("I", 0x1F4, (len(payload) + 15) // 16)    # syssize, 16-byte units
    put("H", 0x1FE, 0xAA55)                       # boot_flag
    setup[0x200:0x202] = b"\xeb\x66"              # jump over the header
    setup[0x202:0x206] = b"HdrS"                  # header magic
    put("H", 0x206, 0x020F)                       # boot protocol 2.15
    put("B", 0x210, 0)                            # type_of_loader
    put("B", 0x211, 0x01)                         # loadflags: LOADED_HIGH
    put("I", 0x214, LOAD_ADDR)                    # code32_start
    put("I", 0x230, 0x200000)                     # kernel_alignment
    put("B", 0x234, 0)                            # relocatable_kernel: no
    put("B", 0x235, 21)                           # min_alignment: 2 MiB
    put("H", 0x236, 0x1)                          # xloadflags: XLF_KERNEL_64
    put("I", 0x238, 2047)                         # cmdline_size
    put("Q", 0x258, LOAD_ADDR)                    # pref_address
    put("I", 0x260, init_size)                    # init_size: image + .bss

    with open(out_path, "wb") as f:
        f.write(setup)
        f.write(payload)


if __name__ == "__main__":
    main()
