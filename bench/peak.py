"""python bench/peak.py REPORT.json PYTHON-ARGS...: run `python PYTHON-ARGS` and write its peak RSS to REPORT.json.

Why a launcher: Linux folds the memory high-water mark of the process that spawns a program into that program's
ru_maxrss (exec keeps the larger of the old and new address spaces' peaks), so a stage started straight from the
bench, which holds a few hundred MB itself, would report at least the bench's RSS. Started from this small
process instead, a stage's figure is its own (plus this launcher's ~10 MB at most).
"""

import json
import os
import sys

report, argv = sys.argv[1], [sys.executable, *sys.argv[2:]]
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, argv)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "peak_rss_bytes": usage.ru_maxrss * 1024}, f)
