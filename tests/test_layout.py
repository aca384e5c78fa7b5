"""The two halves stay apart: loading/ never imports prepare/ nor prepare/ loading/, and formats/ imports
neither; a trainer that imports the loader and the Dataset loads none of the preparation stack."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "imgprep"


def imported_modules(path: Path) -> set[str]:
    """Every imgprep module a file's import statements name, at any depth (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import of {node.module}"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("imgprep.")}


@pytest.mark.parametrize("half, forbidden", [("loading", ("imgprep.prepare",)), ("prepare", ("imgprep.loading",)),
                                             ("formats", ("imgprep.prepare", "imgprep.loading"))])
def test_no_import_statement_crosses_between_the_halves(half, forbidden):
    crossing = {str(path.relative_to(PACKAGE)): sorted(name for name in imported_modules(path)
                                                        if name.startswith(forbidden))
                for path in sorted((PACKAGE / half).glob("*.py"))}
    assert not {path: names for path, names in crossing.items() if names}


def modules_loaded_by(*modules: str) -> list[str]:
    """sys.modules after importing `modules` in a fresh interpreter."""
    code = ("import importlib, json, sys\n"
            f"for name in {list(modules)!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))")
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout)


def test_a_trainer_importing_the_loader_and_the_dataset_loads_no_preparation_module():
    loaded = modules_loaded_by("imgprep.loading.loader", "imgprep.loading.dataset")
    assert "imgprep.loading.loader" in loaded and "imgprep.loading.dataset" in loaded
    assert not [name for name in loaded if name.startswith("imgprep.prepare")]
    assert not [name for name in loaded if name.split(".")[0] in ("joblib", "loky", "scipy", "dask")]


def test_a_trainer_opening_a_loader_and_a_dataset_and_reading_batches_loads_no_preparation_module(tmp_path):
    """Not only importing: building the pipeline, choosing the device and reading batches too."""
    code = f"""
import json, sys
import numpy as np
from imgprep.formats.codec import encode_datum
from imgprep.formats.storage import open_writer
writer = open_writer({str(tmp_path / "db")!r}, "lmdb")
writer.put_batch([(b"%08d_x" % i, encode_datum(np.zeros((3, 32, 32), np.uint8).tobytes(), i % 2, 3, 32, 32, False))
                  for i in range(8)])
writer.close()
from imgprep import CaffeDataset, Loader
with Loader({str(tmp_path / "db")!r}, batch_size=4, train=False, policy="center", crop=16, resize_shorter=32,
            device="cpu", num_threads=1) as loader:
    assert sum(len(labels) for _, labels in loader) == 8
dataset = CaffeDataset({str(tmp_path / "db")!r}, train=False, crop=16, resize_shorter=32)
assert len(dataset) == 8 and dataset[0][1] == 0
print(json.dumps(sorted(name for name in sys.modules if name.startswith("imgprep.prepare"))))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_the_public_api_imports_its_parts_only_when_used():
    loaded = modules_loaded_by("imgprep")
    assert not [name for name in loaded if name.startswith(("imgprep.prepare", "imgprep.loading"))]
    loaded = modules_loaded_by("imgprep.prepare.build", "imgprep.prepare.make_lists", "imgprep.prepare.mean",
                               "imgprep.prepare.merge", "imgprep.prepare.inspection")
    assert not [name for name in loaded if name.startswith(("imgprep.loading", "nvidia.dali", "torch"))]


def test_every_public_name_resolves_and_is_documented():
    import imgprep

    for name in imgprep.__all__:
        value = getattr(imgprep, name)
        if callable(value):
            assert (value.__doc__ or "").strip(), f"imgprep.{name} has no docstring"
    with pytest.raises(AttributeError):
        imgprep.not_a_name  # noqa: B018


DOCUMENTED = [*sorted((PACKAGE / "formats").glob("*.py")), *sorted((PACKAGE / "prepare").glob("*.py")),
              *(PACKAGE / "prepare" / f"{name}.py" for name in ("download", "make_lists", "merge", "inspection",
                                                                "resize", "sample", "workflow", "progress")),
              *(PACKAGE / "loading" / f"{name}.py" for name in ("plan", "draws", "policies", "graph", "records", "loader",
                                                                "dataset", "options", "bench", "preview", "peers")),
              PACKAGE / "env.py", PACKAGE / "demo.py", PACKAGE / "cli.py"]


def undocumented(path: Path) -> list[str]:
    """The public functions, classes and methods (names without a leading _) of a file that have no docstring."""
    missing = []

    def walk(body, prefix=""):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not node.name.startswith("_") and not ast.get_docstring(node):
                    missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {prefix}{node.name}")
                if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                    walk(node.body, f"{node.name}.")

    walk(ast.parse(path.read_text()).body)
    return missing


@pytest.mark.parametrize("path", DOCUMENTED, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_public_function_class_and_method_has_a_docstring(path):
    assert not undocumented(path)


def test_public_names_do_not_clash_with_subpackages():
    """`imgprep.X` for a subpackage X is the subpackage once anything in it is imported: no public name may be one."""
    import imgprep
    import imgprep.prepare.build  # noqa: F401  (sets imgprep.prepare to the subpackage)
    from imgprep import build_database, prepare_data

    assert callable(prepare_data) and callable(build_database)
    subpackages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    assert not subpackages & set(imgprep.__all__)
