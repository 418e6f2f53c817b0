#!/usr/bin/env bash
# Runs every test: builds the images and the workspace (release, once), then the unit and
# integration tests, formatting and lints, then the nested KVM lab (tests/lab/run.sh), where the
# Linux-guest and vm-backend suites run. Installs what it needs; safe to run on a fresh machine.
# Ends with the list of tests that did not run and why, and one line `N passed, N failed`.
#
# AIRLOCK_LAB=1 runs the lab; without it the summary lists the lab as not run (it is not steady
# enough for CI yet: tests/lab/README.md, "When the lab misbehaves").
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
lab_notes=()
# --workspace includes the test guest crate, whose pure logic is unit-tested on the host.
cargo test --release --workspace 2>&1 | tee "$logs/cargo-test.log" || failed_steps+=("cargo test")
stamp "workspace tests done"
cargo clippy --release --workspace --all-targets -- -D warnings || failed_steps+=("clippy")
cargo clippy --release -p airlock-test-guest --target x86_64-unknown-none -- -D warnings || failed_steps+=("clippy (test guest)")

# The lab: the Linux-guest, vm-backend and jailer cgroup v2 suites inside a nested KVM host (about
# 8 minutes on 2 cores). AIRLOCK_LAB=0 leaves it out, and the summary says so.
if [ "${AIRLOCK_LAB:-0}" = 0 ]; then
    echo "NOT RUN tests/lab/run.sh (every lab suite): opt-in (AIRLOCK_LAB=1) again since 2026-12-06, when its L1 did not finish two runs in a row (tests/lab/README.md, \"When the lab misbehaves\")" | tee "$logs/lab.log"
else
    # The lab is a nested emulation (QEMU TCG running KVM running Linux), and it is not yet
    # steady: in about one full run in three the L1 host wedged or panicked before its suites
    # ended, and one run saw two vm tests whose guest stopped answering (tests/lab/README.md,
    # "When the lab misbehaves"). So: an L1 that did not finish is run once more whole; suites
    # with a failed test in an L1 that finished are run once more on their own. Every first
    # failure stays in the summary (a "note:" line with its log), and the counts are the second
    # run's for what was run twice.
    if ! bash tests/lab/run.sh 2>&1 | tee "$logs/lab.log"; then
        cp "$logs/lab.log" "$logs/lab-first-run.log"
        cp target/lab/console.log "$logs/lab-console-first-run.log" 2>/dev/null || true
        [ ! -s target/lab/stall.log ] || cp target/lab/stall.log "$logs/lab-stall-first-run.log"
        if [ -s target/lab/stall.log ] || grep -q "the L1 host did not finish its suites" "$logs/lab.log"; then
            lab_notes+=("the lab's L1 did not finish its first run ($logs/lab-first-run.log, $logs/lab-console-first-run.log); the counts are its second run's")
            stamp "${lab_notes[-1]}"
            bash tests/lab/run.sh 2>&1 | tee "$logs/lab.log" || failed_steps+=("the lab")
        else
            mapfile -t again < <(sed -n 's|^lab: FAILED  \([^/]*\)/.*|\1|p' "$logs/lab.log" | sort -u)
            if [ "${#again[@]}" -eq 0 ]; then
                failed_steps+=("the lab")
            else
                first_failures=$(sed -n 's|^lab: FAILED  ||p' "$logs/lab.log" | tr '\n' ' ')
                lab_notes+=("in the lab's first run these failed: ${first_failures}($logs/lab-first-run.log); suites ${again[*]} were run once more, and their counts are the second run's")
                stamp "${lab_notes[-1]}"
                bash tests/lab/run.sh "${again[@]}" 2>&1 | tee "$logs/lab-again.log" || failed_steps+=("the lab (suites ${again[*]}, run twice)")
                # Counts: the first run's other suites, and the second run of these.
                {
                    for s in "${again[@]}"; do printf '%s\n' "$s"; done | sort -u >"$logs/lab-again.suites"
                    grep -E '^lab: (ok|FAILED)  ' "$logs/lab-first-run.log" |
                        grep -v -F -f <(sed 's|.*|  &/|' "$logs/lab-again.suites") || true
                    grep -E '^lab: (ok|FAILED)  ' "$logs/lab-again.log" || true
                    grep -h 'NOT RUN' "$logs/lab-first-run.log" "$logs/lab-again.log" | sort -u || true
                } >"$logs/lab.log"
                awk '/^lab: ok  / {p++} /^lab: FAILED  / {f++} END {print p + 0 " passed, " f + 0 " failed"}' "$logs/lab.log" >>"$logs/lab.log"
            fi
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
for n in "${lab_notes[@]}"; do echo "note: $n"; done
for s in "${failed_steps[@]}"; do echo "failed: $s"; done
passed=$((cargo_passed - cargo_not_run + lab_passed))
failed=$((cargo_failed + lab_failed))
stamp "finished"
echo "$passed passed, $failed failed"
[ "${#failed_steps[@]}" -eq 0 ] && [ "$failed" -eq 0 ]
