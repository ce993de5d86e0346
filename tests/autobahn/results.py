#!/usr/bin/env python3
"""Autobahn|Testsuite results against the expectations kept beside this file.

    results.py check  SPEC AGENT EXPECTED [VERDICT...]   fails (exit 1) if a case is worse
    results.py update SPEC AGENT EXPECTED                writes the results as expectations

SPEC is the fuzzingclient's spec the suite ran with (its report index, `index.json`, is read
from its `outdir`; only the cases it selects are compared or replaced), AGENT the agent name,
EXPECTED a JSON file: case -> {behavior, behaviorClose, remoteCloseCode}. Both print a
summary per case group. The verdicts judged are `behavior` and `behaviorClose`, or those
named; by rank: a case is worse when one falls to a lower rank than expected (OK, then
NON-STRICT, then UNIMPLEMENTED, then WRONG CODE / UNCLEAN / FAILED BY CLIENT, then FAILED).
A better result passes and is named, so that the expectations can be tightened with
`update`. The close code is kept for the reader, not judged (a wrong one makes
`behaviorClose` WRONG CODE): after a fix it changes without getting worse.
"""

import fnmatch
import json
import os
import sys
from collections import Counter, OrderedDict

RANK = {
    "OK": 0,
    # Cases whose outcome the suite does not judge.
    "INFORMATIONAL": 0,
    "NON-STRICT": 1,
    "UNIMPLEMENTED": 2,
    "WRONG CODE": 3,
    "UNCLEAN": 3,
    "FAILED BY CLIENT": 3,
    "FAILED": 4,
}
# A case missing from the report, or a verdict the suite has no name for.
WORST = max(RANK.values()) + 1
JUDGED = ("behavior", "behaviorClose")
BEHAVIORS = ("OK", "NON-STRICT", "FAILED", "INFORMATIONAL", "UNIMPLEMENTED")


def case_key(case):
    return tuple(int(part) for part in case.split("."))


def selected(spec):
    """Whether the spec runs a case: Autobahn's own matching of its case patterns."""

    def matches(case, patterns):
        return any(fnmatch.fnmatchcase(case, p) for p in patterns)

    return lambda case: matches(case, spec["cases"]) and not matches(
        case, spec.get("exclude-cases", [])
    )


def load_results(index_path, agent):
    with open(index_path) as f:
        index = json.load(f)
    if agent not in index:
        sys.exit("%s: no results for agent %r (has %s)" % (index_path, agent, list(index)))
    results = OrderedDict()
    for case in sorted(index[agent], key=case_key):
        r = index[agent][case]
        results[case] = OrderedDict(
            (k, r.get(k)) for k in ("behavior", "behaviorClose", "remoteCloseCode")
        )
        results[case]["duration"] = r.get("duration")
    return results


def summary(results, title):
    """Per group (the case number's first part): counts of each verdict."""
    groups = OrderedDict()
    for case, r in results.items():
        groups.setdefault(case.split(".")[0], []).append(r)
    print("%s: %d cases" % (title, len(results)))
    widths = [max(len(name), 3) for name in BEHAVIORS]
    head = "  ".join(name.rjust(w) for name, w in zip(BEHAVIORS, widths))
    print("  group  cases  %s  | close OK  not OK" % head)
    for group, rs in groups.items():
        b = Counter(r["behavior"] for r in rs)
        close_ok = sum(1 for r in rs if rank(r["behaviorClose"]) == 0)
        cells = "  ".join(str(b[name]).rjust(w) for name, w in zip(BEHAVIORS, widths))
        print(
            "  %5s  %5d  %s  | %8d  %6d"
            % (group, len(rs), cells, close_ok, len(rs) - close_ok)
        )
    for verdict in ("FAILED", "NON-STRICT", "UNIMPLEMENTED"):
        cases = [c for c, r in results.items() if r["behavior"] == verdict]
        if cases:
            print("  %s (%d): %s" % (verdict, len(cases), " ".join(cases)))
    closes = Counter(r["behaviorClose"] for r in results.values())
    bad_close = [c for c, r in results.items() if rank(r["behaviorClose"]) > 0]
    if bad_close:
        print(
            "  close not OK (%d: %s): %s"
            % (
                len(bad_close),
                ", ".join("%s %d" % kv for kv in sorted(closes.items()) if rank(kv[0]) > 0),
                compress(bad_close),
            )
        )
    slowest = max(results.items(), key=lambda kv: kv[1]["duration"] or 0)
    total = sum(r["duration"] or 0 for r in results.values())
    print(
        "  time in cases: %.1f s; slowest %s (%s ms)"
        % (total / 1000.0, slowest[0], slowest[1]["duration"])
    )


def compress(cases):
    """Consecutive cases of one group as ranges: 1.1.1-1.1.8 rather than eight names."""
    out, run = [], []

    def flush():
        if run:
            out.append(run[0] if len(run) == 1 else "%s-%s" % (run[0], run[-1]))

    for case in cases:
        key = case_key(case)
        if run and case_key(run[-1])[:-1] == key[:-1] and case_key(run[-1])[-1] + 1 == key[-1]:
            run.append(case)
        else:
            flush()
            run = [case]
    flush()
    return " ".join(out)


def rank(verdict):
    return RANK.get(verdict, WORST)


def compare(results, expected, judged):
    """(worse, better) lines, one per case and judged verdict."""
    worse, better = [], []
    for case in sorted(set(expected) | set(results), key=case_key):
        got = results.get(case, {})
        want = expected.get(case)
        if want is None:
            # A case the expectations do not know: only a clean result passes.
            want = {k: "OK" for k in judged}
        for k in judged:
            g, w = got.get(k, "(missing)"), want.get(k)
            line = "  %-9s %-13s got %-16s expected %s" % (case, k, g, w)
            if rank(g) > rank(w):
                worse.append(line)
            elif rank(g) < rank(w):
                better.append(line)
    return worse, better


def expectations(results, expected, runs):
    """The results, and the expectations of the cases this run did not select."""
    merged = dict((c, r) for c, r in expected.items() if not runs(c))
    for case, r in results.items():
        merged[case] = OrderedDict((k, v) for k, v in r.items() if k != "duration")
    return OrderedDict((c, merged[c]) for c in sorted(merged, key=case_key))


def main(argv):
    if len(argv) < 5 or argv[1] not in ("check", "update"):
        sys.exit(__doc__)
    mode, spec_path, agent, expected_path = argv[1:5]
    judged = tuple(argv[5:]) or JUDGED
    if any(k not in JUDGED for k in judged):
        sys.exit("only %s can be judged" % " and ".join(JUDGED))
    with open(spec_path) as f:
        spec = json.load(f)
    runs = selected(spec)
    results = load_results(os.path.join(spec["outdir"], "index.json"), agent)
    results = OrderedDict((c, r) for c, r in results.items() if runs(c))
    summary(results, agent)
    expected = {}
    if os.path.exists(expected_path):
        with open(expected_path) as f:
            expected = json.load(f)
    if mode == "update":
        with open(expected_path, "w") as f:
            json.dump(expectations(results, expected, runs), f, indent=2)
            f.write("\n")
        print("  expectations written to %s" % expected_path)
        return 0
    expected = dict((c, r) for c, r in expected.items() if runs(c))
    worse, better = compare(results, expected, judged)
    if better:
        print("  better than expected (tighten with scripts/autobahn --update):")
        print("\n".join(better))
    if worse:
        print("  WORSE than expected:")
        print("\n".join(worse))
        return 1
    print("  no case worse than expected (judged: %s)" % ", ".join(judged))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
