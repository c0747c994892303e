"""Repository scripts that are not part of a package (benchmarks/*.py, setup.py), loaded as
modules for the tests."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(relative_path, monkeypatch=None):
    """ROOT/relative_path as a module named after its file. Benchmarks import their siblings
    (timers.py, bench_train.py): given monkeypatch, the script's folder is on sys.path for the
    test."""
    path = ROOT / relative_path
    if monkeypatch is not None:
        monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
