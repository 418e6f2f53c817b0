#!/usr/bin/env python3
"""Reads the lab's results (one libtest log per test executable, written by the L1) and prints
every test's outcome, the tests that did not run and why, and one closing line
`N passed, N failed`. Exit status 0 only when nothing failed and the L1 finished.

A test that cannot run prints `NOT RUN <test>: <reason>` (airlock_tests::not_run); it counts as
not run, not as passed. An executable that ends without libtest's `test result:` line (a crash, or
the L1's time running out) fails as a whole.

usage: summarize.py RESULTS_DIR CONSOLE_LOG QEMU_EXIT_STATUS
"""
import os
import re
import sys

TEST_LINE = re.compile(r"^test (\S+) \.\.\. ", re.M)
NOT_RUN = re.compile(r"NOT RUN (\S+?): (.*)$", re.M)


def parse(text):
    names = TEST_LINE.findall(text)
    not_run = dict(NOT_RUN.findall(text))
    ignored = set(re.findall(r"^test (\S+) \.\.\. ignored", text, re.M))
    failed = set()
    finished = "test result:" in text
    # libtest lists the failed tests, indented, under the last "failures:" before its result.
    blocks = text.split("\nfailures:\n")
    if len(blocks) > 1:
        for line in blocks[-1].splitlines():
            m = re.match(r"^    (\S+)$", line)
            if m:
                failed.add(m.group(1))
            elif line.startswith("test result:"):
                break
    return names, not_run, ignored, failed, finished


def main(results, console, qemu_rc):
    passed, failed, not_run = [], [], []
    logs = sorted(os.listdir(results), key=lambda n: int(n.split("-")[0])) if os.path.isdir(results) else []
    for name in logs:
        _, suite, target = name[: -len(".log")].split("-", 2)
        with open(os.path.join(results, name), errors="replace") as f:
            text = f.read()
        names, skips, ignored, bad, finished = parse(text)
        for t in names:
            label = f"{suite}/{target}::{t}"
            if t in bad:
                failed.append(label)
            elif t in skips:
                not_run.append(f"{label}: {skips[t]}")
            elif t in ignored:
                not_run.append(f"{label}: ignored")
            elif finished:
                passed.append(label)
            else:
                failed.append(f"{label} (the executable ended before its result)")
        if not finished:
            tail = " | ".join(text.strip().splitlines()[-3:])
            failed.append(f"{suite}/{target}: no libtest result line (crashed or out of time): {tail}")
    with open(console, errors="replace") as f:
        console_text = f.read()
    if "LAB: done" not in console_text:
        failed.append(f"the L1 host did not finish its suites (qemu exit status {qemu_rc}); see {console}")
    if not logs:
        failed.append("the L1 wrote no results")
    for p in passed:
        print(f"lab: ok      {p}")
    for f_ in failed:
        print(f"lab: FAILED  {f_}")
    if not_run:
        print(f"lab: {len(not_run)} tests did not run:")
        for n in not_run:
            print(f"lab: NOT RUN {n}")
    print(f"{len(passed)} passed, {len(failed)} failed")
    return 0 if not failed else 1


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3]))
