#!/usr/bin/env bash
# Runs each release's own master directly against two workers of the same release (no replhub)
# and prints one verdict line per release; exits non-zero if any release fails.
#
# Usage: interop/check_direct.sh [RELEASE...]   (default: 1.12.4 1.13.0 1.22.1 1.66.0)
# Creates the release virtualenvs first (scripts/interop-setup; a no-op when they exist).
# LOG_DIR (optional) keeps every process's JSON lines under $LOG_DIR/<release>/.
set -euo pipefail

cd "$(dirname "$0")/.."
RELEASES=("$@")
if [[ ${#RELEASES[@]} -eq 0 ]]; then RELEASES=(1.12.4 1.13.0 1.22.1 1.66.0); fi

scripts/interop-setup "${RELEASES[@]}" >&2
status=0
for release in "${RELEASES[@]}"; do
    log=()
    if [[ -n "${LOG_DIR:-}" ]]; then log=(--log-dir "$LOG_DIR/$release"); fi
    python3 interop/run_pair.py --release "$release" "${log[@]}" || status=1
done
exit $status
