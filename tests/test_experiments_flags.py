"""Bad flag values stop a script before any work, with a one-line message naming the flag
(absl bounds and validators: issue 20's "nothing silent")."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each case: argv, a fragment of the message. One subprocess per script parses them all.
CASES = {
    "gpt_fp4": [(["--steps=-5"], "steps"), (["--steps=0"], "steps"), (["--lr=-1"], "--lr"),
                (["--lr=nan"], "--lr"), (["--context=0"], "context"),
                (["--batch_size=0"], "batch_size"), (["--log_every=0"], "log_every"),
                (["--eval_every=0"], "eval_every"), (["--checkpoint_every=0"], "checkpoint_every"),
                (["--workdir=README.md/x"], "--workdir"), (["--seeds=0"], "--seeds"),
                (["--seeds=1,1"], "distinct"), (["--seed=-1"], "seed"), (["--seeds=two"], "--seeds must be a count")],
    "vit_tetrajet": [(["--steps=0"], "steps"), (["--batch_size=0"], "batch_size"),
                     (["--seeds=-1"], "--seeds"), (["--seeds=3,x"], "--seeds"),
                     (["--stop_at=0"], "stop_at"), (["--warmup=-1"], "warmup"),
                     (["--workdir=README.md"], "is a file, not a directory")],
    "ptq": [(["--calibration=0"], "calibration"),
            (["--workdir=README.md"], "--workdir 'README.md' is a file")],
    "sweep": [(["--rows=0"], "rows"), (["--elements="], "--elements"),
              (["--roundings="], "--roundings"),
              (["--workdir=README.md/runs"], "which is a file")],
}

_PARSE = r"""
import importlib, json, sys
from absl import flags
mod = importlib.import_module("experiments." + sys.argv[1])
mod.define_flags()
out = []
for argv, _ in json.loads(sys.argv[2]):
  try:
    flags.FLAGS(["prog"] + argv)
    out.append(None)
  except flags.Error as e:
    out.append(str(e))
  flags.FLAGS.unparse_flags()
print(json.dumps(out))
"""


@pytest.mark.parametrize("script", sorted(CASES))
def test_bad_flag_values_are_rejected_at_parse_time(script):
  cases = CASES[script]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", _PARSE, script, json.dumps(cases)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=240)
  assert res.returncode == 0, res.stderr[-2000:]
  messages = json.loads(res.stdout.strip().splitlines()[-1])
  for (argv, fragment), msg in zip(cases, messages):
    assert msg is not None, f"{script} {argv} was accepted"
    assert fragment in msg and "\n" not in msg.strip(), (argv, msg)
