"""The layout's rules: data flows one way, and only the entry point reaches into the trainers."""

import ast
import glob
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINERS = "vidlankd_jax.train"
# The only modules outside train/ that may run a stage: the entry point (and what it dispatches)
# and the pod plan (which compiles a stage's step through the stage contract).
ENTRY_POINTS = {"vidlankd_jax/main.py", "vidlankd_jax/plan.py"}


def imported_modules(path: str) -> set[str]:
  """Every module a file imports, at the top or inside functions."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def is_trainer(module: str) -> bool:
  return module == TRAINERS or module.startswith(TRAINERS + ".")


def python_files(*patterns: str) -> list[str]:
  files = []
  for pattern in patterns:
    files += glob.glob(os.path.join(REPO_ROOT, pattern), recursive=True)
  return sorted(os.path.relpath(f, REPO_ROOT) for f in files)


def test_only_the_entry_point_imports_the_trainers():
  library = python_files("vidlankd_jax/**/*.py", "tools/*.py")
  offenders = {
      path: sorted(m for m in imported_modules(os.path.join(REPO_ROOT, path)) if is_trainer(m))
      for path in library
      if not path.startswith("vidlankd_jax/train/") and path not in ENTRY_POINTS
  }
  offenders = {path: modules for path, modules in offenders.items() if modules}
  assert not offenders, f"import vidlankd_jax.train only through {ENTRY_POINTS}: {offenders}"


def test_checkpoint_depends_on_the_train_state_not_on_a_trainer():
  modules = imported_modules(os.path.join(REPO_ROOT, "vidlankd_jax", "checkpoint.py"))
  assert "vidlankd_jax.train_state" in modules
  assert not [m for m in modules if is_trainer(m)]


def test_configs_are_files_not_an_imported_package():
  """The config files import the library; the library reads them as files (configlib.load)."""
  assert not os.path.exists(os.path.join(REPO_ROOT, "configs", "__init__.py"))
  for path in python_files("vidlankd_jax/**/*.py", "tools/*.py", "bench/*.py", "configs/*.py"):
    modules = imported_modules(os.path.join(REPO_ROOT, path))
    assert not [m for m in modules if m == "configs" or m.startswith("configs.")], path


def test_the_pretraining_steps_and_benchmarks_import_without_tensorflow():
  """Accelerator images carry JAX, not TensorFlow: the steps the device benchmarks time must
  import without it (TensorFlow is imported only where files are read)."""
  script = (
      "import sys; sys.path.insert(0, 'bench'); "
      "import vidlankd_jax.train.distill, vidlankd_jax.train.teacher, distill_step, teacher_step; "
      "loaded = [m for m in ('tensorflow', 'seqio', 'tensorflow_text') if m in sys.modules]; "
      "assert not loaded, loaded"
  )
  result = subprocess.run(
      [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]
