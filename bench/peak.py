"""python bench/peak.py REPORT.json PYTHON-ARGS...: run `python PYTHON-ARGS` and write its peak RSS to REPORT.json.

Why a launcher: Linux folds the memory high-water mark of the process that spawns a program into that program's
ru_maxrss (exec keeps the larger of the old and new address spaces' peaks), so a stage started straight from the
bench, which holds a few hundred MB itself, would report at least the bench's RSS. Started from this small
process instead, a stage's figure is its own (plus this launcher's ~10 MB at most).

A stage may start processes of its own (verify's PyTorch side), and ru_maxrss reports the largest single process
of the tree, not what the tree held at once. So this launcher also samples the summed RSS of the whole tree every
20 ms, and the peak it reports is the larger of the two (shared library pages count once per process: an upper
bound).
"""

import json
import os
import sys
import threading


def tree_rss(root: int) -> int:
    """Summed resident bytes of `root` and its descendants (0 for a process already gone)."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(child) for child in f.read().split()]
        except OSError:
            continue
    return total


report, argv = sys.argv[1], [sys.executable, *sys.argv[2:]]
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, argv)
sampled, done = [0], threading.Event()


def sample() -> None:
    while not done.wait(0.02):
        sampled[0] = max(sampled[0], tree_rss(pid))


sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
_, status, usage = os.wait4(pid, 0)
done.set()
sampler.join()
largest_process = usage.ru_maxrss * 1024
with open(report, "w") as f:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "peak_rss_bytes": max(largest_process, sampled[0]),
               "largest_process_rss_bytes": largest_process, "sampled_tree_rss_bytes": sampled[0]}, f)
