#!/usr/bin/env bash
# Checks that BINARY runs on every x86_64 Linux with glibc >= MAX (default 2.17): it fails
# when the binary references a versioned glibc symbol above MAX, or needs a shared library
# other than glibc's. Prints the highest version and the libraries it needs.
# Usage: packaging/check-glibc.sh BINARY [MAX]
set -euo pipefail
bin=${1:?usage: check-glibc.sh BINARY [MAX]}
max=${2:-2.17}
[ -f "$bin" ] || { echo "check-glibc: $bin: no such file" >&2; exit 1; }

# Every GLIBC_x.y[.z] version the binary's dynamic symbols and version needs name.
versions=$( { objdump -T "$bin"; readelf -V --wide "$bin"; } 2>/dev/null \
    | grep -o 'GLIBC_[0-9][0-9.]*[0-9]' | sed 's/^GLIBC_//' | sort -V -u)
if [ -z "$versions" ]; then
    echo "check-glibc: $bin references no versioned glibc symbol (static or not glibc)" >&2
    exit 1
fi
highest=$(printf '%s\n' "$versions" | tail -1)
too_new=$(printf '%s\n' "$versions" | while read -r v; do
    [ "$(printf '%s\n%s\n' "$max" "$v" | sort -V | tail -1)" = "$max" ] || echo "$v"; done)
needed=$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
# Only glibc's own libraries (and the gcc runtime every glibc system has) may be needed.
for lib in $needed; do
    case "$lib" in
        libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | libutil.so.1 \
            | ld-linux-x86-64.so.2 | libgcc_s.so.1) ;;
        *) echo "check-glibc: FAIL $bin needs $lib, which not every glibc system has" >&2; exit 1 ;;
    esac
done
if [ -n "$too_new" ]; then
    echo "check-glibc: FAIL $bin needs GLIBC $(echo $too_new), above $max:" >&2
    for v in $too_new; do
        objdump -T "$bin" | grep -E "GLIBC_${v//./\\.}\\)?[[:space:]]" | awk -v v="$v" '{print "  " $NF "@GLIBC_" v}' \
            | head -3 >&2
    done
    exit 1
fi
echo "check-glibc: ok $bin: highest GLIBC_$highest (<= $max); needs: $needed"
