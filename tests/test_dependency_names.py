"""Nothing at the repository root shadows a package of the stack: ``python -m ...`` and
``python -m pytest`` put the root first on ``sys.path``."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def root_import_names():
    """Names ``import NAME`` resolves to the root: folders (packages or namespace portions) and modules."""
    names = {path.name for path in ROOT.iterdir() if path.is_dir() and path.name.isidentifier()}
    return names | {path.stem for path in ROOT.glob("*.py")}


def test_no_root_name_is_a_top_level_package_of_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in root_import_names() - {"lora_da"} if name in installed}
    assert not clashes, f"importable from the repository root and installed by {clashes}"


def test_stack_imports_its_own_kernels_package_from_the_repository_root():
    # Hugging Face's `kernels` is a dependency of transformers (and of the test extra)
    distribution = importlib.metadata.distribution("kernels")
    script = ("import transformers.modeling_utils, peft, kernels; "
              "print(kernels.__file__); print(hasattr(kernels, 'get_kernel'))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    location, has_get_kernel = out.stdout.split()
    assert Path(location).resolve().is_relative_to(Path(distribution.locate_file("")).resolve()), location
    assert not Path(location).resolve().is_relative_to(ROOT / "lora_da"), location
    assert has_get_kernel == "True"
