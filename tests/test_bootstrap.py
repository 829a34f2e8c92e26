"""The Python bootstrap's own helpers, run in this process (no sandbox)."""

from __future__ import annotations

import importlib.util
import io
import zipfile

import cloudpickle
import pytest

from nanogrid.packaging import package_function
from tests.conftest import ROOT


@pytest.fixture
def bootstrap(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("nanogrid_bootstrap_under_test", ROOT / "runtimes/python/bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "CODE_DIR", str(tmp_path))
    return module


def test_remote_traceback_shows_source_lines_whatever_name_pickling_gives_the_code(bootstrap, tmp_path):
    """What must never happen: a pickler renaming code objects (cloudpickle 3.1.3 did) hides the user's lines."""

    def restock(item):
        def check():
            raise LookupError(f"no {item} left")

        return check()

    package = package_function(restock)
    with zipfile.ZipFile(io.BytesIO(package.data)) as zf:
        zf.extractall(tmp_path)
        function = cloudpickle.loads(zf.read("function.pkl"))
    # Whatever a future pickler calls the code, the bootstrap must give it back its name.
    function.__code__ = bootstrap.with_source_file(function.__code__, "<renamed-by-some-pickler>")
    bootstrap.remember_source(package.manifest)
    bootstrap.restore_source_file(function, package.manifest)
    with pytest.raises(LookupError) as info:
        function("apples")
    error, _ = bootstrap.describe_error(info.value, cloudpickle)
    assert 'raise LookupError(f"no {item} left")' in error["traceback"]
    assert "return check()" in error["traceback"]
    assert package.manifest["source_file"] in error["traceback"]
    assert "<renamed-by-some-pickler>" not in error["traceback"]
