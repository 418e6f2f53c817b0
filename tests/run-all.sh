#!/usr/bin/env bash
# Runs every test: builds the images and the workspace (release, once), then the unit and
# integration tests, formatting and lints, then the nested KVM lab (tests/lab/run.sh), where the
# Linux-guest and vm-backend suites run. Installs what it needs; safe to run on a fresh machine.
# Ends with the list of tests that did not run and why, and one line `N passed, N failed`.
#
# AIRLOCK_LAB=0 leaves the lab out (the summary then lists it as not run).
set -euo pipefail
cd "$(dirname "$0")/.."
logs=target/test-logs
mkdir -p "$logs"
rm -f "$logs"/*.log
started=$(date +%s)
stamp() { printf 'run-all: %s (%d s)\n' "$*" $(($(date +%s) - started)) >&2; }

# The test guest and the default image, then the python image (about a minute, cached after).
bash images/build.sh
bash images/build.sh python
for component in clippy rustfmt; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done
stamp "images built"

cargo fmt --all --check
cargo build --release --workspace
stamp "workspace built"
failed_steps=()
# --workspace includes the test guest crate, whose pure logic is unit-tested on the host.
cargo test --release --workspace 2>&1 | tee "$logs/cargo-test.log" || failed_steps+=("cargo test")
stamp "workspace tests done"
cargo clippy --release --workspace --all-targets -- -D warnings || failed_steps+=("clippy")
cargo clippy --release -p airlock-test-guest --target x86_64-unknown-none -- -D warnings || failed_steps+=("clippy (test guest)")

# The lab: the Linux-guest, vm-backend and jailer cgroup v2 suites inside a nested KVM host (about
# 8 minutes on 2 cores). AIRLOCK_LAB=0 leaves it out, and the summary says so.
if [ "${AIRLOCK_LAB:-1}" = 0 ]; then
    echo "NOT RUN tests/lab/run.sh (every lab suite): AIRLOCK_LAB=0 was given" | tee "$logs/lab.log"
else
    if ! bash tests/lab/run.sh 2>&1 | tee "$logs/lab.log"; then
        # An L1 that wedges (its console silent: both emulated CPUs spinning in the L1 kernel,
        # seen in about one full lab run in three, not yet diagnosed) is run once more; the
        # first run's report is kept and the summary says that it happened.
        if [ -s target/lab/stall.log ]; then
            cp target/lab/stall.log "$logs/lab-stall-first-run.log"
            cp target/lab/console.log "$logs/lab-console-first-run.log"
            lab_wedged="the lab's L1 wedged in its first run ($logs/lab-stall-first-run.log, $logs/lab-console-first-run.log); the counts are its second run's"
            stamp "$lab_wedged"
            bash tests/lab/run.sh 2>&1 | tee "$logs/lab.log" || failed_steps+=("the lab")
        else
            failed_steps+=("the lab")
        fi
    fi
    stamp "lab done"
fi

# --- summary -------------------------------------------------------------------------------------
# libtest counts a test that printed its NOT RUN line and returned as passed: count it as not run.
read -r cargo_passed cargo_failed < <(awk '/^test result:/ {p += $4; f += $6} END {print p + 0, f + 0}' "$logs/cargo-test.log")
cargo_not_run=$(grep -c 'NOT RUN ' "$logs/cargo-test.log" || true)
read -r lab_passed lab_failed < <(awk '/^[0-9]+ passed, [0-9]+ failed$/ {p = $1; f = $3} END {print p + 0, f + 0}' "$logs/lab.log")
echo
echo "tests that did not run, and why:"
{
    grep -h -o 'NOT RUN .*' "$logs/cargo-test.log" "$logs/lab.log" | sed 's/^NOT RUN /  /'
    # #[ignore]d tests, with the reason libtest prints after "ignored, ".
    grep -h -o '^test [^ ]* \.\.\. ignored.*' "$logs/cargo-test.log" | sed 's/^test \([^ ]*\) \.\.\. ignored,* */  \1: ignored: /'
} | sort -u | grep . || echo "  (none)"
[ -z "${lab_wedged:-}" ] || echo "note: $lab_wedged"
for s in "${failed_steps[@]}"; do echo "failed: $s"; done
passed=$((cargo_passed - cargo_not_run + lab_passed))
failed=$((cargo_failed + lab_failed))
stamp "finished"
echo "$passed passed, $failed failed"
[ "${#failed_steps[@]}" -eq 0 ] && [ "$failed" -eq 0 ]
