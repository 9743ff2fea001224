"""Every code block of README.md meant to run is run here, as written.

The convention (README, "Code in this README"): fenced ```python and ```sh blocks run
(python with exec, sh with `bash -e`, each in a scratch directory) unless the line before
the block is `<!-- norun: why -->`. Indented blocks (commands needing a GPU, a cluster, a
dataset or many minutes) are not run, but every `python -m experiments.<module>` command in
any code block must name an existing module, its own flags and existing config fields.
"""
import os
import re
import shlex
import subprocess

import pytest

from qgnn_jax import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
RUNNABLE = ("python", "sh")
NORUN = re.compile(r"<!--\s*norun\b")
# absl's own flags, accepted by every entry point.
ABSL_FLAGS = {"help", "helpfull", "helpshort", "helpxml", "verbosity", "v", "logtostderr",
              "alsologtostderr", "log_dir", "flagfile", "only_check_args"}


def _lines():
  with open(README, encoding="utf-8") as f:
    return f.read().splitlines()


def fenced_blocks():
  """[(language, code, line number, preceding non-blank line)] of every fenced block."""
  lines, out, i = _lines(), [], 0
  while i < len(lines):
    m = re.match(r"^```(\w*)\s*$", lines[i])
    if m:
      j = i + 1
      while not lines[j].startswith("```"):
        j += 1
      before = next((l for l in reversed(lines[:i]) if l.strip()), "")
      out.append((m.group(1), "\n".join(lines[i + 1:j]) + "\n", i + 1, before))
      i = j
    i += 1
  return out


def indented_blocks():
  """[(code, line number)] of the indented (4-space) code blocks outside fences."""
  lines, out, in_fence, i = _lines(), [], False, 0
  while i < len(lines):
    if lines[i].startswith("```"):
      in_fence = not in_fence
    elif (not in_fence and lines[i].startswith("    ") and lines[i].strip()
          and (i == 0 or not lines[i - 1].strip())):
      j = i
      while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
        j += 1
      out.append(("\n".join(l[4:] for l in lines[i:j]) + "\n", i + 1))
      i = j
      continue
    i += 1
  return out


def runnable(lang):
  return [(code, n) for l, code, n, before in fenced_blocks()
          if l == lang and not NORUN.search(before)]


def module_flags(module):
  """The flag names experiments/<module>.py defines (absl DEFINE_* / config_flags /
  experiments.cli.define_config_flag)."""
  with open(os.path.join(ROOT, "experiments", f"{module}.py"), encoding="utf-8") as f:
    src = f.read()
  # (experiments.run defines --config through experiments.cli.define_config_flag.)
  return set(re.findall(r"(?:DEFINE_\w+|define_config_flag)\(\s*\"(\w+)\"", src)) | ABSL_FLAGS


def experiment_commands():
  """[(module, [args], line)] for every `python -m experiments.X ...` in a code block."""
  codes = [(code, n) for _, code, n, _ in fenced_blocks()] + indented_blocks()
  out = []
  for code, n in codes:
    for line in code.replace("\\\n", " ").splitlines():
      for m in re.finditer(r"python -m experiments\.(\w+)(.*)", line):
        rest = re.split(r"&&|\||;|&(?!\S)|\"", m.group(2))[0]
        out.append((m.group(1), shlex.split(rest.split("#")[0]), n))
  return out


def test_the_readme_has_code_blocks_of_each_kind():
  assert runnable("python") and runnable("sh") and indented_blocks()
  assert len(experiment_commands()) >= 5


@pytest.mark.parametrize("command", experiment_commands(),
                         ids=lambda c: f"line{c[2]}-{c[0]}")
def test_every_experiments_command_names_real_flags_and_fields(command):
  module, args, line = command
  assert os.path.exists(os.path.join(ROOT, "experiments", f"{module}.py")), (module, line)
  known = module_flags(module)
  for k, arg in enumerate(args):
    arg = arg.strip("[]")
    if not arg.startswith("--"):
      continue
    name = arg[2:].split("=", 1)[0]
    if name.startswith("config.") and module in ("run",):
      assert name[7:] in run_config.FIELD_CHECKS, f"README line {line}: unknown field {arg}"
    elif name.startswith("no") and name[2:] in known:
      continue
    else:
      assert name in known, f"README line {line}: experiments.{module} has no flag --{name}"
    if name == "config" and k + 1 < len(args) and "=" not in arg:
      assert os.path.exists(os.path.join(ROOT, args[k + 1])), f"README line {line}: {args[k + 1]}"


@pytest.mark.parametrize("block", runnable("python"), ids=lambda b: f"line{b[1]}")
def test_python_blocks_run_as_written(block, tmp_path, monkeypatch, capsys):
  code, line = block
  monkeypatch.chdir(tmp_path)
  exec(compile(code, f"README.md:{line}", "exec"), {"__name__": f"readme_line{line}"})


@pytest.mark.slow
@pytest.mark.parametrize("block", runnable("sh"), ids=lambda b: f"line{b[1]}")
def test_shell_blocks_run_as_written(block, tmp_path):
  code, line = block
  os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  out = subprocess.run(["bash", "-e", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1800)
  assert out.returncode == 0, f"README.md:{line}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
