#!/bin/sh
# moqui-standin.sh: a stand-in for MOQUI's tps_env, for `mqic demo` and tests. It simulates
# nothing: it prints the log phrases the executor parses, writes one clearly synthetic file
# per delivery folder, and fails on request.
#
# Usage: moqui-standin.sh <case_dir> <output_dir> <gpu_id>
#
# Log grammar (stdout): a header containing "with N batches", then for each batch
# "Generating particles for (i of N batches)", then "Total execution time: X seconds".
# Failure lines go to stderr.
#
# Environment:
#   MQIC_DEMO_BATCHES      batches to print (default 10)
#   MQIC_DEMO_BATCH_SLEEP  seconds between batches (default 0.05)
#   MQIC_DEMO_FAIL         exit | nogpu | hang | nomarker; when unset, the first word of
#                          <case_dir>/MQIC_DEMO_FAIL is used, so one case can fail on its own
#   MQIC_LEDGER            if set, a successful run appends
#                          "<MQIC_CASE_ID> <MQIC_STEP> <MQIC_ATTEMPT>" to this file

set -u

# printf, not echo: dash's echo expands backslashes, and paths may hold some.
say() {
    printf '%s\n' "$*"
}

usage() {
    say "usage: moqui-standin.sh <case_dir> <output_dir> <gpu_id>" >&2
    exit 64
}

[ "$#" -eq 3 ] || usage
case_dir=$1
output_dir=$2
gpu_id=$3
[ -n "$gpu_id" ] || usage
if [ ! -d "$case_dir" ]; then
    say "FATAL ERROR: case directory $case_dir does not exist" >&2
    exit 2
fi

batches=${MQIC_DEMO_BATCHES:-10}
case $batches in
    '' | *[!0-9]* | 0)
        say "moqui-standin: MQIC_DEMO_BATCHES must be a positive integer, not '$batches'" >&2
        exit 64
        ;;
esac
batch_sleep=${MQIC_DEMO_BATCH_SLEEP:-0.05}

fail=${MQIC_DEMO_FAIL:-}
if [ -z "$fail" ] && [ -f "$case_dir/MQIC_DEMO_FAIL" ]; then
    read -r fail _rest <"$case_dir/MQIC_DEMO_FAIL" || :
fi
case $fail in
    '' | exit | nogpu | hang | nomarker) ;;
    *)
        say "moqui-standin: unknown MQIC_DEMO_FAIL '$fail' (exit, nogpu, hang, nomarker)" >&2
        exit 64
        ;;
esac

started=$(date +%s)
say "MOQUI stand-in (synthetic, mqic demo): case $case_dir on GPU $gpu_id with $batches batches"

if [ "$fail" = nogpu ]; then
    say "No free GPU remains after BeamLayerMultiGpu filtering" >&2
    exit 1
fi

# Read the input first, as MOQUI does: a case with no deliveries fails before any batch.
plan_infos=$(find "$case_dir" -name PlanInfo.txt -type f | sort)
if [ -z "$plan_infos" ]; then
    say "FATAL ERROR: no delivery folder with PlanInfo.txt under $case_dir" >&2
    exit 2
fi

half=$(((batches + 1) / 2))
i=1
while [ "$i" -le "$batches" ]; do
    say "Generating particles for ($i of $batches batches)"
    if [ "$fail" = exit ] && [ "$i" -eq "$half" ]; then
        say "FATAL ERROR: synthetic failure requested (MQIC_DEMO_FAIL=exit) in batch $i" >&2
        exit 2
    fi
    if [ "$fail" = hang ]; then
        # Replaces the shell, so killing this process id stops the hang with nothing left over.
        exec sleep 2147483647
    fi
    if [ "$i" -lt "$batches" ]; then
        sleep "$batch_sleep" 2>/dev/null || :
    fi
    i=$((i + 1))
done

if ! mkdir -p "$output_dir/Dose"; then
    say "FATAL ERROR: cannot create $output_dir/Dose" >&2
    exit 2
fi
say "$plan_infos" | while IFS= read -r info; do
    delivery=$(dirname "$info")
    beam=$(sed -n 's/^DICOM_BEAM_NUMBER,//p' "$info" | tr -d '\r ')
    [ -n "$beam" ] || beam=$(basename "$delivery")
    {
        say "SYNTHETIC OUTPUT OF THE MQIC DEMO MOQUI STAND-IN: NOT DICOM, NOT A DOSE"
        say "delivery $delivery"
        say "beam $beam"
        say "gpu $gpu_id"
        say "batches $batches"
    } >"$output_dir/Dose/RTDOSE_$beam.dcm" || exit 2
    say "Wrote $output_dir/Dose/RTDOSE_$beam.dcm"
done || {
    say "FATAL ERROR: cannot write results under $output_dir/Dose" >&2
    exit 2
}

if [ "$fail" != nomarker ]; then
    say "Total execution time: $(($(date +%s) - started)) seconds"
fi

if [ -n "${MQIC_LEDGER:-}" ]; then
    say "${MQIC_CASE_ID:--} ${MQIC_STEP:--} ${MQIC_ATTEMPT:--}" >>"$MQIC_LEDGER" || exit 2
fi
exit 0
