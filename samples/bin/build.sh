#!/bin/sh
# Rebuild the example binaries from their sources with GNU binutils.
set -e
cd "$(dirname "$0")"
as --32 vmdetect.s -o /tmp/vmdetect.$$.o
ld -m elf_i386 --build-id=none -o vmdetect /tmp/vmdetect.$$.o
rm -f /tmp/vmdetect.$$.o
