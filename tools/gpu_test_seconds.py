"""Refreshes ``tests/gpu_test_seconds.json`` from a GPU test command log.

    DURATIONS=0 tools/test_gpu.sh 2>&1 | tee gpu.log
    python tools/gpu_test_seconds.py gpu.log

``tests/conftest.py`` orders the GPU run longest-first by these seconds (so with
``--maxschedchunk=1`` the 16 workers finish together rather than some idling while others
hold a queue); tests that the log lacks keep their earlier figure, and new tests get a
default there."""

from __future__ import annotations

import collections
import json
import os
import re
import sys

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                    "gpu_test_seconds.json")
LINE = re.compile(r"^([0-9.]+)s (call|setup|teardown)\s+(.+?)\s*$")
MIN_SECONDS = 1.0   # shorter tests sort with the default; listing them would only add noise


def main(log: str) -> None:
  seconds = collections.defaultdict(float)
  with open(log) as f:
    for line in f:
      m = LINE.match(line.strip())
      if m:
        seconds[m.group(3)] += float(m.group(1))
  if not seconds:
    sys.exit(f"{log}: no pytest --durations lines (run the GPU command with DURATIONS=0)")
  old = json.load(open(PATH))["seconds"] if os.path.exists(PATH) else {}
  new = {**old, **{k: round(v, 1) for k, v in seconds.items() if v >= MIN_SECONDS}}
  doc = json.load(open(PATH)) if os.path.exists(PATH) else {"_about": ""}
  doc["seconds"] = dict(sorted(new.items()))
  with open(PATH, "w") as f:
    json.dump(doc, f, indent=0, sort_keys=True)
  print(f"{PATH}: {len(new)} tests, {sum(new.values()):.0f} s in all")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python tools/gpu_test_seconds.py GPU_TEST_LOG")
  main(sys.argv[1])
