"""
Restart benchmark for txgrace (prints figures; not a pass/fail test).

Serves the test app on two endpoints, then restarts it --restarts times in a
row: SIGHUP to the serving pid, wait for the next generation's Serving
event, wait for the old pid to exit.  Each generation is measured right
after it is ready, with no client connected (open fds from /proc/PID/fd,
VmRSS from /proc/PID/status), and measured again once its predecessor has
exited; then one request to each endpoint proves that it serves.

"Right after it is ready" is 50 ms after its predecessor logged that it got
READY (generation 1: 50 ms after its Serving line).  A successor closes its
control channel just after writing READY, so a measurement taken at the
Serving line, or at the predecessor's log line on a loaded machine, can
still count that socket; the JSON keeps the Serving-line measurement too.

Targets: generation N has as many fds as generation 1, and an RSS within 5%.

Run from the repository root:

    .venv/bin/python bench/generations.py [--restarts 100] [--json FILE]

Everything listens on 127.0.0.1 only; every server process is started here
and killed by pid (ServerProcess.kill) if it is still alive at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    APP,
    HOST,
    ROOT,
    machineInfo,
    printMachineInfo,
    summary,
    writeJSON,
)

from txgrace.testing import (  # noqa: E402
    ServerProcess,
    isAlive,
    slowRequest,
    waitUntil,
)

ENDPOINT = f"grace:tcp:0:interface={HOST}"
READY_SETTLE = 0.05


def fdKinds(pid: int) -> dict[str, int]:
    """
    What C{pid}'s descriptors are: C{socket}, C{pipe}, C{anon_inode:...}, or
    a path.
    """
    kinds: Counter[str] = Counter()
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        try:
            target = os.readlink(os.path.join(directory, name))
        except OSError:
            continue
        kinds[target.split(":[", 1)[0] if ":[" in target else target] += 1
    return dict(sorted(kinds.items()))


def measure(pid: int) -> dict[str, Any]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = None
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
                break
    return {"fds": fds, "rss_kb": rss, "fd_kinds": fdKinds(pid)}


def checkServes(serving: Any) -> list[str]:
    bodies = []
    for index in range(len(serving.addresses)):
        status, body = slowRequest(HOST, serving.port(index), "/", timeout=10)
        text = body.decode("utf-8", "replace").strip()
        if status != 200 or f"pid {serving.pid}" not in text:
            raise AssertionError(
                f"generation {serving.generation} (pid {serving.pid}) port "
                f"{serving.port(index)} answered {status} {text!r}"
            )
        bodies.append(text)
    return bodies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=100)
    parser.add_argument(
        "--timeout", type=float, default=60.0,
        help="seconds each generation has to become ready, and each old pid to exit",
    )
    parser.add_argument("--json", metavar="FILE")
    options = parser.parse_args()

    info = machineInfo()
    printMachineInfo(info)
    print(
        f"\n{options.restarts} consecutive restarts (SIGHUP), two endpoints "
        f"{ENDPOINT}, app {APP}"
    )
    sys.stdout.flush()

    server = ServerProcess(
        ["--endpoint", ENDPOINT, "--endpoint", ENDPOINT, "--app", APP], cwd=ROOT
    )
    generations: list[dict[str, Any]] = []
    readySeconds: list[float] = []
    oldExitSeconds: list[float] = []
    error = None
    ports: list[int] = []
    try:
        current = server.waitServing(1, timeout=options.timeout)
        time.sleep(READY_SETTLE)
        ports = [current.port(i) for i in range(len(current.addresses))]
        record = {"generation": 1, "pid": current.pid, "at_ready": measure(current.pid)}
        record["settled"] = record["at_serving_log"] = record["at_ready"]
        checkServes(current)
        generations.append(record)
        for number in range(2, options.restarts + 2):
            old = current
            started = time.monotonic()
            server.signal(signal.SIGHUP, old.pid)
            current = server.waitServing(number, timeout=options.timeout)
            atServingLog = measure(current.pid)
            # Ready: the predecessor has logged that it got READY.  The
            # successor logs Serving, writes READY and only then closes its
            # control channel; on a loaded machine that close can come a
            # millisecond or so after the predecessor's log line, so the
            # measurement waits READY_SETTLE seconds more.
            newPid = current.pid
            server.waitFor(
                lambda e: e.get("log_namespace") == "txgrace.lifecycle"
                and e.get("successor") == newPid
                and "hands over" in e.get("log_format", ""),
                options.timeout,
            )
            ready = time.monotonic()
            time.sleep(READY_SETTLE)
            atReady = measure(current.pid)
            if not waitUntil(lambda: not isAlive(old.pid), options.timeout, step=0.005):
                raise AssertionError(
                    f"generation {old.generation} (pid {old.pid}) did not exit "
                    f"within {options.timeout}s"
                )
            exited = time.monotonic()
            settled = measure(current.pid)
            samePorts = [current.port(i) for i in range(len(current.addresses))] == ports
            if not samePorts:
                raise AssertionError(f"generation {number} listens on {current.addresses}")
            checkServes(current)
            readySeconds.append(ready - started)
            oldExitSeconds.append(exited - started)
            generations.append(
                {
                    "generation": number,
                    "pid": current.pid,
                    "at_serving_log": atServingLog,
                    "at_ready": atReady,
                    "settled": settled,
                    "sighup_to_ready_s": ready - started,
                    "sighup_to_old_exit_s": exited - started,
                }
            )
            if number % 10 == 1 or number == options.restarts + 1:
                print(
                    f"    ... generation {number} ready "
                    f"(restart {number - 1}/{options.restarts})"
                )
                sys.stdout.flush()
    except AssertionError as e:
        error = str(e)
        print(f"\nSTOPPED: {error}")
    finally:
        server.kill()

    if len(generations) < 2:
        writeJSON(options.json, {"machine": info, "error": error, "generations": generations})
        sys.exit(1)

    first, last = generations[0], generations[-1]
    show = sorted(
        {1, 2, 10, 25, 50, 75, 100, last["generation"]}
        & {g["generation"] for g in generations}
    )
    byNumber = {g["generation"]: g for g in generations}
    print(
        "\n    generation   pid      fds@ready  RSS@ready kB   fds@settled  "
        "RSS@settled kB   SIGHUP->ready   SIGHUP->old exit"
    )
    for number in show:
        g = byNumber[number]
        print(
            f"    {number:>10}   {g['pid']:<7}  {g['at_ready']['fds']:>9}  "
            f"{g['at_ready']['rss_kb']:>12}   {g['settled']['fds']:>11}  "
            f"{g['settled']['rss_kb']:>14}   "
            + (
                f"{g['sighup_to_ready_s'] * 1000:>11.0f} ms   "
                f"{g['sighup_to_old_exit_s'] * 1000:>13.0f} ms"
                if number > 1
                else f"{'-':>14}   {'-':>16}"
            )
        )
    results: dict[str, Any] = {
        "restarts_done": len(generations) - 1,
        "restarts_asked": options.restarts,
        "error": error,
    }
    print()
    for when in ("at_ready", "settled"):
        fdRatio = last[when]["fds"] / first[when]["fds"]
        rssRatio = last[when]["rss_kb"] / first[when]["rss_kb"]
        fdsMet = last[when]["fds"] == first[when]["fds"]
        rssMet = abs(rssRatio - 1) <= 0.05
        results[when] = {
            "first": first[when],
            "last": last[when],
            "fd_ratio": fdRatio,
            "rss_ratio": rssRatio,
            "fds_equal": fdsMet,
            "rss_within_5pct": rssMet,
        }
        label = "right after ready" if when == "at_ready" else "after the old pid exited"
        print(
            f"    {label}: generation {last['generation']} / generation 1: "
            f"fds {last[when]['fds']}/{first[when]['fds']} = {fdRatio:.3f} "
            f"(target equal: {'met' if fdsMet else 'MISSED'}), "
            f"RSS {last[when]['rss_kb']}/{first[when]['rss_kb']} kB = {rssRatio:.3f} "
            f"(target within 5%: {'met' if rssMet else 'MISSED'})"
        )
        if not fdsMet:
            print(
                f"        fd kinds: generation 1 {first[when]['fd_kinds']}; "
                f"generation {last['generation']} {last[when]['fd_kinds']}"
            )
    for when, label in (
        ("at_ready", "right after ready"),
        ("settled", "after the old pid exited"),
        ("at_serving_log", "at the Serving log line (races the control channel close)"),
    ):
        fdCounts = Counter(g[when]["fds"] for g in generations)
        rssValues = [g[when]["rss_kb"] for g in generations]
        print(
            f"    {label}, all generations: fds {dict(sorted(fdCounts.items()))} "
            f"(count: generations); RSS min {min(rssValues)} kB, max {max(rssValues)} kB"
        )
    ready = summary(readySeconds)
    exits = summary(oldExitSeconds)
    print(
        f"    time per restart, SIGHUP -> new generation ready: median "
        f"{ready['median'] * 1000:.0f} ms, max {ready['max'] * 1000:.0f} ms"
    )
    print(
        f"    time per restart, SIGHUP -> old pid exited: median "
        f"{exits['median'] * 1000:.0f} ms, max {exits['max'] * 1000:.0f} ms"
    )
    print(
        f"    every generation answered one request on each of its "
        f"{len(ports)} endpoints with its own pid"
        if error is None
        else "    (stopped early; see above)"
    )
    results["sighup_to_ready_s"] = ready
    results["sighup_to_old_exit_s"] = exits
    writeJSON(
        options.json, {"machine": info, "results": results, "generations": generations}
    )
    if error is not None:
        sys.exit(1)


if __name__ == "__main__":
    main()
