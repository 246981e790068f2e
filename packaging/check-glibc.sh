#!/usr/bin/env bash
# Fails when BINARY references a versioned glibc symbol above MAX (default 2.17), so the
# binary runs on every x86_64 Linux with glibc >= MAX. Prints the highest version and the
# shared libraries it needs. Usage: packaging/check-glibc.sh BINARY [MAX]
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
if [ -n "$too_new" ]; then
    echo "check-glibc: FAIL $bin needs GLIBC $(echo $too_new), above $max:" >&2
    for v in $too_new; do
        objdump -T "$bin" | grep -E "GLIBC_${v//./\\.}\\)?[[:space:]]" | awk -v v="$v" '{print "  " $NF "@GLIBC_" v}' \
            | head -3 >&2
    done
    exit 1
fi
echo "check-glibc: ok $bin: highest GLIBC_$highest (<= $max); needs: $needed"
