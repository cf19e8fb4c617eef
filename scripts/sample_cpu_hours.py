"""Sample the CPU seconds and step of background training runs, for gain per CPU-hour.

    setsid nohup python3 scripts/sample_cpu_hours.py shake=data/pretrain_shake \
        shake_deep=data/pretrain_shake_deep --out data/cpu_hours.csv &

Every ``--every`` seconds appends ``time,run,pid,cpu_s,step`` per live run: the trainer's process
CPU time (user + system, from /proc) and the last step its progress bar printed in
``WORK/train.log``. A resumed run is a new pid whose CPU time starts again at 0;
``bench/bench_cpu_training.py`` adds the restarts up. Standard library only.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import time
from pathlib import Path

STEP = re.compile(r"\| *(\d+)/\d+ \[")


def sample(name: str, work: Path, tick: int) -> list | None:
    try:
        pid = int((work / "train.pid").read_text())
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick
        tail = (work / "train.log").read_bytes()[-4000:].decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return None   # not running (or between restarts)
    steps = STEP.findall(tail)
    return [int(time.time()), name, pid, round(cpu, 1), steps[-1] if steps else ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="NAME=WORK")
    ap.add_argument("--out", type=Path, default=Path("data/cpu_hours.csv"))
    ap.add_argument("--every", type=float, default=60.0)
    args = ap.parse_args()
    runs = {name: Path(work) for name, work in (r.split("=", 1) for r in args.runs)}
    tick = os.sysconf("SC_CLK_TCK")
    new = not args.out.exists()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["time", "run", "pid", "cpu_s", "step"])
        while True:
            for name, work in runs.items():
                row = sample(name, work, tick)
                if row:
                    writer.writerow(row)
            f.flush()
            time.sleep(args.every)


if __name__ == "__main__":
    main()
