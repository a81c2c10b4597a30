"""Libraries' start-up lines and warnings stay out of the commands' output (vidlankd_jax/quiet.py);
the project's own output and errors stay in."""

import logging as std_logging
import os
import subprocess
import sys
import types

from vidlankd_jax import quiet

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What TensorFlow's and XLA's C++ code prints on start-up when nothing keeps it out.
NOISE = ("I0000", "W0000", "E0000", "absl::InitializeLog", "cudart")


def command(args, tmp_path):
  """Runs `python <args>` from the repository as a user would (no TF_CPP_MIN_LOG_LEVEL set);
  returns the exit code and stdout + stderr."""
  env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS")}
  env["PYTHONPATH"] = REPO_ROOT
  done = subprocess.run(
      [sys.executable, *args],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  return done.returncode, done.stdout + done.stderr


def test_start_up_noise_is_dropped_and_other_output_kept(capfd, tmp_path, monkeypatch):
  (tmp_path / "noisy_module_for_test.py").write_text(
      "import os\n"
      "os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are "
      "written to STDERR\\n')\n"
      "os.write(2, b'I0000 00:00:1796054534.149019  536 port.cc:153] oneDNN custom operations\\n')\n"
      "os.write(2, b'a line of its own\\n')\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  quiet.import_quietly(["noisy_module_for_test"])
  err = capfd.readouterr().err
  assert err == "a line of its own\n"
  record = types.SimpleNamespace(levelno=30, pathname="/x/site-packages/orbax/checkpoint/m.py")
  assert not quiet.LibraryNoiseFilter().filter(record)  # a library's warning: noise
  record.pathname = "/work/vidlankd_jax/train/loop.py"
  assert quiet.LibraryNoiseFilter().filter(record)  # the project's own warning stays
  record.pathname, record.levelno = "/x/site-packages/tensorflow/python/m.py", 40
  assert quiet.LibraryNoiseFilter().filter(record)  # a library's error stays
  record.pathname = "/x/site-packages/orbax/checkpoint/m.py"
  assert not quiet.LibraryNoiseFilter().filter(record)  # Orbax's: a CheckpointSaveError says it


def test_library_warnings_are_dropped_from_the_absl_log(capfd):
  from absl import logging

  quiet.quiet_libraries()
  quiet.quiet_libraries()  # a second call adds no second filter
  assert logging.get_verbosity() == logging.WARNING
  absl_logger = std_logging.getLogger("absl")
  assert sum(isinstance(f, quiet.LibraryNoiseFilter) for f in absl_logger.filters) == 1
  handler = std_logging.StreamHandler(sys.stderr)
  absl_logger.addHandler(handler)
  try:
    for pathname, message in (
        ("/x/site-packages/orbax/checkpoint/manager.py", "Given directory is read only"),
        ("/work/vidlankd_jax/train/loop.py", "a warning of the project's own"),
    ):
      absl_logger.handle(absl_logger.makeRecord("absl", 30, pathname, 1, message, None, None))
  finally:
    absl_logger.removeHandler(handler)
  err = capfd.readouterr().err
  assert "a warning of the project's own" in err and "read only" not in err, err


def test_a_tool_run_as_a_script_prints_no_start_up_lines(tmp_path):
  corpus = tmp_path / "corpus.txt"
  line = " ".join(f"word{i % 37} the town by strong winds" for i in range(30))
  corpus.write_text((line + "\n") * 8)  # 13 blocks of 126 word pieces
  code, output = command(
      [
          os.path.join(REPO_ROOT, "tools", "make_text_tfrecords.py"),
          f"--input={corpus}",
          f"--output_dir={tmp_path / 'out'}",
          "--prefix=x",
          "--split=validation",
          "--num_shards=1",
      ],
      tmp_path,
  )
  assert code == 0, output[-2000:]
  assert (tmp_path / "out" / "x-validation.tfrecord-00000-of-00001").exists()
  assert '"blocks"' in output  # the tool's own summary line stays
  assert not [n for n in NOISE if n in output], output[-2000:]


def test_the_entry_point_prints_its_error_and_no_start_up_lines(tmp_path):
  # A data error: TensorFlow is loaded (the text pipeline) before the missing shards are found.
  code, output = command(
      [
          "-m",
          "vidlankd_jax.main",
          f"--config={os.path.join(REPO_ROOT, 'configs', 'teacher.py')}:size=tiny",
          f"--config.data.data_dir={tmp_path / 'no_data'}",
          f"--workdir={tmp_path / 'run'}",
      ],
      tmp_path,
  )
  assert code == 1, output[-2000:]
  assert "Traceback" not in output and not [n for n in NOISE if n in output], output[-2000:]
  last = output.strip().splitlines()[-1]
  assert last.startswith("error: ") and "no train shards" in last, output[-2000:]
