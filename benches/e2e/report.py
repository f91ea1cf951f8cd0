#!/usr/bin/env python3
"""Helpers of benches/e2e.sh: records, comparisons and the final table.

Subcommands (all print to stdout; nothing here starts processes):
  corrupt GOOD OUT           write GOOD to OUT with 64 bytes flipped in the middle
  record ...                 one JSON measurement from timings, GNU time's "%M %U %S" and access log
  merge LAST_JSON            LAST_JSON's object updated with the object on stdin
  compare DIR STORE KEYS     how many of KEYS in DIR are missing or differ from STORE
  rehydrate REPORT VERIFY    fields from rehydrate's --json restore and verify reports
  say RECORD_JSON            one human line about a record
  table RESULTS ...          the medians table
"""
import argparse
import json
import os
import statistics
import sys

GIB = float(1 << 30)


def corrupt(good, out):
    data = bytearray(open(good, "rb").read())
    mid = len(data) // 2
    for i in range(mid, min(mid + 64, len(data))):
        data[i] ^= 0xFF
    if os.path.exists(out):
        os.unlink(out)  # a hard link to the good object: replace, do not write through
    with open(out, "wb") as f:
        f.write(data)


def record(a):
    secs = float(a.t1) - float(a.t0)
    rss = own_cpu = None
    try:
        lines = [l for l in open(a.rss_file).read().split("\n") if l.strip()]
        fields = lines[-1].split()
        rss = int(fields[0])
        if len(fields) >= 3:
            own_cpu = float(fields[1]) + float(fields[2])
    except (OSError, ValueError, IndexError):
        pass
    requests = s503 = other_errors = 0
    with open(a.access) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            requests += 1
            if parts[1] == "503":
                s503 += 1
            elif not parts[1].startswith("2"):
                other_errors += 1
    print(json.dumps({
        "round": a.round, "workload": a.workload, "client": a.client, "bytes": a.bytes,
        "secs": secs, "bytes_per_sec": a.bytes / secs if secs > 0 else 0.0,
        "busy_secs": a.busy_jiffies / a.clk_tck, "rss_kib": rss, "own_cpu_secs": own_cpu,
        "server_cpu_secs": a.server_jiffies / a.clk_tck,
        "requests": requests, "s503": s503, "other_errors": other_errors, "exit": a.exit,
    }))


def merge(last):
    rec = json.load(open(last))
    rec.update(json.load(sys.stdin))
    print(json.dumps(rec))


def compare(directory, store, keys):
    missing = corrupt_n = 0
    for key in open(keys).read().split():
        path = os.path.join(directory, key)
        if not os.path.exists(path):
            missing += 1
            continue
        with open(path, "rb") as got, open(os.path.join(store, key), "rb") as want:
            while True:
                a, b = got.read(1 << 20), want.read(1 << 20)
                if a != b:
                    corrupt_n += 1
                    break
                if not a:
                    break
    print(json.dumps({"corrupt_written": corrupt_n, "missing": missing}))


def rehydrate(report_path, verify_path):
    try:
        r = json.load(open(report_path))
    except (OSError, ValueError):
        r = {}
    fetch = r.get("fetch", {})
    secondary = sum(n for name, n in fetch.get("served_by_source", []) if name != "primary")
    failed = r.get("blocks_failed")
    out = {"secondary": secondary, "hedges": fetch.get("hedges"), "client_requests": fetch.get("requests"),
           "retries": fetch.get("retries"), "corrupt_responses": fetch.get("corrupt_responses"),
           "missing": failed, "verified": False, "corrupt_written": None,
           "tail_secs": r.get("timings", {}).get("tail_secs")}
    try:
        v = json.load(open(verify_path))
        mismatched = len(v.get("mismatched", []))
        out["corrupt_written"] = max(0, mismatched - (failed or 0))
        out["verified"] = mismatched == 0 and v.get("blocks_checked") == v.get("blocks_total")
    except (OSError, ValueError):
        pass
    print(json.dumps(out))


def say(rec):
    r = json.loads(rec)
    extra = ""
    for k in ("secondary", "hedges", "corrupt_written", "missing"):
        if r.get(k) is not None:
            extra += f" {k}={r[k]}"
    if r.get("job_secs"):
        extra += " jobs=" + ",".join(f"{x:.2f}" for x in r["job_secs"])
    print(f"  {r['workload']:3} {r['client']:22} {r['secs']:7.2f} s {r['bytes_per_sec'] / GIB:6.3f} GiB/s "
          f"cpu {r['busy_secs']:6.2f} s req {r['requests']} 503 {r['s503']} exit {r['exit']}{extra}")


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def table(a):
    recs = [json.loads(l) for l in open(a.results) if l.strip()]
    rounds = sorted({r["round"] for r in recs})
    # Per round, W1's best s5cmd becomes its own row; W2-W5 s5cmd rows are one group.
    rows = {}
    order = []

    def add(key, rec):
        if key not in rows:
            rows[key] = []
            order.append(key)
        rows[key].append(rec)

    for rnd in rounds:
        rr = [r for r in recs if r["round"] == rnd]
        for r in rr:
            if r["client"].startswith("rehydrate beside "):
                continue  # a W1 run paired with one workload: only its ratio's denominator
            if r["client"].startswith("s5cmd") and r["workload"] != "W1":
                add((r["workload"], "s5cmd at W1's best -w"), r)
            else:
                add((r["workload"], r["client"]), r)
        for half, prefix in (("fio best", "fio "), ("GET stream best", "GET stream -P")):
            tried = [r for r in rr if r["workload"] == "P" and r["client"].startswith(prefix)]
            if tried:
                best = max(tried, key=lambda r: r["bytes_per_sec"])
                add(("P", half), dict(best, best_of=best["client"]))
        w1 = [r for r in rr if r["workload"] == "W1" and r["client"].startswith("s5cmd")]
        if w1:
            best = max(w1, key=lambda r: r["bytes_per_sec"])
            add(("W1", "s5cmd best"), dict(best, best_of=best["client"]))

    def rate(key):
        return med([r["bytes_per_sec"] for r in rows.get(key, [])])

    p = rate(("P", "P: GET stream + fio"))
    wl_order = ["P", "W1", "W2", "W2b", "W3", "W4", "W5", "W7", "W7s", "W8", "W8s", "W8c", "W9", "W10", "CPU"]
    order.sort(key=lambda k: (wl_order.index(k[0]) if k[0] in wl_order else 99,
                              0 if k[1].endswith(" best") and k[0] == "P" else
                              1 if k[1].startswith("GET") or k[1].startswith("fio") else 2 if k[1].startswith("P") else
                              2 if k[1].startswith("s5cmd -w") else 3 if k[1].startswith("s5cmd") else 4))

    head = ["wl", "client", "GiB/s", "/P", "/W1", "/s5cmd", "time/W1", "jobs +-%", "own CPU s/GiB", "tail s", "CPU s/GiB",
            "server CPU s/GiB", "RSS MiB", "requests", "503s",
            "secondary", "hedges", "corrupt written", "missing", "exit"]
    # rehydrate's time on each workload over its W1 time in the same round,
    # the W1 run right before it where there is one: the rounds drift with
    # the machine, the pairs much less.
    # Each binary against its own W1 ("rehydrate old" against the old one's;
    # W10's worker against the new one's).
    # The reference client's rows ("wrk") against its own W1-shaped row.
    w1 = {(r["round"], r["client"]): r for r in recs
          if r["workload"] == "W1" and (r["client"].startswith("rehydrate") or r["client"] == "wrk")}

    def w1_of(r):
        # The W1 run right before this workload's (e2e.sh's E2E_PAIR; W10's
        # worker too), else the round's.
        if r["client"].startswith("rehydrate") and r["client"] != "rehydrate old":
            beside = w1.get((r["round"], "rehydrate beside " + r["workload"]))
            if beside:
                return beside
        return w1.get((r["round"], r["client"] if r["client"] in ("rehydrate old", "wrk") else "rehydrate"))

    def time_over_w1(rs):  # only where the bytes are W1's
        return med([r["secs"] / w1_of(r)["secs"] if w1_of(r) and w1_of(r)["bytes"] == r["bytes"] else None for r in rs])

    def rate_over_w1(rs):
        return med([r["bytes_per_sec"] / w1_of(r)["bytes_per_sec"] if w1_of(r) else None for r in rs])

    def spread(rs):
        """The largest distance of a job's time from the median job's, in %, worst round."""
        worst = None
        for r in rs:
            secs = r.get("job_secs")
            if secs:
                m = statistics.median(secs)
                d = max(abs(x / m - 1) for x in secs) * 100
                worst = d if worst is None else max(worst, d)
        return worst
    lines = [head]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for key in order:
        rs = rows[key]
        wl, client = key
        g = rate(key)
        if wl == "W1":
            ref = rate(("W1", "s5cmd best"))
        else:
            ref = rate((wl, "s5cmd at W1's best -w"))
        if client.startswith("s5cmd") or wl == "P":
            ref = None
        gib = [r["bytes"] / GIB for r in rs]
        cpu = med([r["busy_secs"] / x for r, x in zip(rs, gib)])
        rss = med([r["rss_kib"] / 1024 if r.get("rss_kib") is not None and wl != "P" else None for r in rs])
        label = client
        if client == "s5cmd best":
            label += " (" + ",".join(sorted({r["best_of"].split()[-1] for r in rs})) + ")"
        elif client.startswith("s5cmd at"):
            label = "s5cmd -w " + ",".join(sorted({r["client"].split()[-1] for r in rs}))
        exits = ",".join(sorted({str(r["exit"]) for r in rs}))
        rehydrate_row = client.startswith("rehydrate")
        reference_row = client == "wrk"
        if client.endswith(" best"):
            label += " (" + ",".join(sorted({r["best_of"] for r in rs})) + ")"
        own = med([r["own_cpu_secs"] / x if r.get("own_cpu_secs") is not None else None for r, x in zip(rs, gib)])
        lines.append([wl, label, fmt(g / GIB, ".3f"), fmt(g / p if p else None, ".2f"),
                      fmt(rate_over_w1(rs) if rehydrate_row or reference_row else None, ".3f"),
                      fmt(g / ref if ref else None, ".2f"),
                      fmt(time_over_w1(rs) if rehydrate_row or reference_row else None, ".3f"), fmt(spread(rs), ".1f"),
                      fmt(own if rehydrate_row else None, ".2f"),
                      fmt(med([r.get("tail_secs") for r in rs]) if rehydrate_row else None, ".3f"),
                      fmt(cpu, ".2f"),
                      fmt(med([r["server_cpu_secs"] / x if r.get("server_cpu_secs") is not None else None
                               for r, x in zip(rs, gib)]), ".2f"),
                      fmt(rss, ".0f"), fmt(med([r["requests"] for r in rs]), ".0f"),
                      fmt(med([r["s503"] for r in rs]), ".0f"), fmt(med([r.get("secondary") for r in rs]), ".0f"),
                      fmt(med([r.get("hedges") for r in rs]), ".0f"),
                      fmt(med([r.get("corrupt_written") for r in rs]), ".0f")
                      + ("" if not rehydrate_row else " (verified)" if all(r.get("verified") for r in rs) else " (NOT verified)"),
                      fmt(med([r.get("missing") for r in rs]), ".0f"), exits])
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    print()
    print(f"rehydrate end to end: {a.size_mib} MiB volume, {a.objects} objects of 1 MiB, medians of {a.runs} run(s); "
          f"binary {a.binary}")
    print(f"machine: {a.machine}")
    print(f"load average: {a.load}")
    print("W1 clean 9080 | W2 300 req/s 9082 (rate_limit 300 configured) | W2b the same, nothing configured | W3 1.2 % 500 9083 (+file secondary) | W4 1.2 % at 256 KiB/s 9084 "
          "(+file secondary) | W5 3 corrupt objects, bucket2 on 9080 (+file secondary) | W7 1 MiB blocks, 30 ms to first "
          "byte 9089 | W7s the same, delays spread over 22-37 ms, 9090 | W8 256 KiB blocks on 9089 | W8s the same on 9090 | W8c the same on 9080 | W9 zstd blocks of data compressing ~2:1, 9080, volume bytes | "
          "W10 8 restores of 512 MiB at once through one `rehydrate serve`, 9080 (aggregate) | CPU: 1 GiB W1 for CPU per GiB")
    print("P: fio best = the best of the fio configurations (engine, queue depth, block size, jobs), GET stream best = "
          "the best curl parallelism; P = both bests at once. /P: throughput over P; /W1: over rehydrate's W1 in the same "
          "round; jobs +-%: W10's largest distance of a job's time from the median job's (worst round); own CPU: "
          "rehydrate's process user+sys s per GiB (GNU time); /s5cmd: rehydrate over s5cmd on the same "
          "workload (W1: s5cmd's best worker count); time/W1: median over rounds of rehydrate's time over its W1 time "
          "in the same round (with E2E_PAIR, the default: the W1 run right before it); tail s: from the last block sent for to the last written; CPU: whole machine busy s per GiB; "
          "server CPU: nginx's worker processes' user+sys s per GiB (on the same cores); wrk: the reference client "
          "(wrk, every object once, as many connections as rehydrate's window admits: 120 of 1 MiB, 409 of 256 KiB; "
          "it only receives), its /W1 and time/W1 over its own W1-shaped row; requests, 503s: nginx access log")
    print()
    for l in lines:
        print("  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(l, widths))))


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    args = sys.argv[2:]
    if cmd == "corrupt":
        corrupt(*args)
    elif cmd == "record":
        p = argparse.ArgumentParser()
        for name in ("workload", "client", "t0", "t1", "rss-file", "access"):
            p.add_argument("--" + name, required=True)
        for name in ("round", "bytes", "busy-jiffies", "server-jiffies", "clk-tck", "exit"):
            p.add_argument("--" + name, required=True, type=int)
        record(p.parse_args(args))
    elif cmd == "merge":
        merge(*args)
    elif cmd == "compare":
        compare(*args)
    elif cmd == "rehydrate":
        rehydrate(*args)
    elif cmd == "say":
        say(*args)
    elif cmd == "table":
        p = argparse.ArgumentParser()
        p.add_argument("results")
        for name in ("size-mib", "objects", "runs", "binary", "machine", "load"):
            p.add_argument("--" + name, required=True)
        table(p.parse_args(args))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
