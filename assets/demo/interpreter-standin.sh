#!/bin/sh
# interpreter-standin.sh: a stand-in for mqi_interpreter plus the moqui_tps.in generator, for
# `mqic demo` and tests. It reads every PlanInfo.txt of a case and writes one synthetic
# moqui_tps_<beam>.in per beam; it interprets no log data.
#
# Usage: interpreter-standin.sh <case_dir> <out_dir> [gpu_id]
#
# A delivery folder is a directory named by a 16-digit timestamp or holding .ptn files; one
# without PlanInfo.txt is an error, reported before anything is written.
#
# Environment:
#   MQIC_LEDGER  if set, a successful run appends
#                "<MQIC_CASE_ID> <MQIC_STEP> <MQIC_ATTEMPT>" to this file

set -u

# printf, not echo: dash's echo expands backslashes, and paths may hold some.
say() {
    printf '%s\n' "$*"
}

if [ "$#" -lt 2 ] || [ "$#" -gt 3 ]; then
    say "usage: interpreter-standin.sh <case_dir> <out_dir> [gpu_id]" >&2
    exit 64
fi
case_dir=$1
out_dir=$2
gpu_id=${3:-0}
if [ ! -d "$case_dir" ]; then
    say "interpreter-standin: case directory $case_dir does not exist" >&2
    exit 2
fi

# Every directory is examined with shell globs only, so large cases cost no process per file.
deliveries=$(find "$case_dir" -type d | sort | while IFS= read -r d; do
    case ${d##*/} in
        [0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9])
            say "$d"
            continue
            ;;
    esac
    for f in "$d"/*.ptn; do
        [ -e "$f" ] && say "$d"
        break
    done
done)
if [ -z "$deliveries" ]; then
    say "interpreter-standin: no delivery folders under $case_dir" >&2
    exit 3
fi

missing=$(say "$deliveries" | while IFS= read -r d; do
    [ -f "$d/PlanInfo.txt" ] || say "$d"
done)
if [ -n "$missing" ]; then
    say "interpreter-standin: delivery folder without PlanInfo.txt: $missing" >&2
    exit 3
fi

if ! mkdir -p "$out_dir"; then
    say "interpreter-standin: cannot create $out_dir" >&2
    exit 2
fi

value() {
    sed -n "s/^$1,//p" "$2" | tr -d '\r'
}

say "$deliveries" | while IFS= read -r d; do
    info=$d/PlanInfo.txt
    beam=$(value DICOM_BEAM_NUMBER "$info")
    layers=$(value STOP_LAYER_NUMBER "$info")
    if [ -z "$beam" ]; then
        say "interpreter-standin: $info has no DICOM_BEAM_NUMBER" >&2
        exit 3
    fi
    tps=$out_dir/moqui_tps_$beam.in
    {
        say "# synthetic moqui_tps.in written by the mqic demo interpreter stand-in"
        say "GPUID $gpu_id"
        say "GantryNum 2"
        say "BeamNumbers $beam"
        say "ParentDir $d"
        say "OutputDir $out_dir/Dose"
        say "OutputFormat dcm"
    } >"$tps" || exit 2
    say "beam $beam: ${layers:-?} layers from $d -> $tps"
done || exit $?

if [ -n "${MQIC_LEDGER:-}" ]; then
    say "${MQIC_CASE_ID:--} ${MQIC_STEP:--} ${MQIC_ATTEMPT:--}" >>"$MQIC_LEDGER" || exit 2
fi
exit 0
