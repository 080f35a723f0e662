"""LoRA-DA: data-aware initialisation of LoRA adapters from one pass over calibration data."""


def _map_source_kernels() -> None:
    """Installed, ``kernels/`` is the subpackage ``lora_da.kernels``; run from a source checkout
    without installing (a GPU machine building in place), map it from the folder beside us."""
    import importlib.util
    import sys
    from pathlib import Path

    if importlib.util.find_spec(__name__ + ".kernels") is not None:
        return
    source = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    spec = importlib.util.spec_from_file_location(__name__ + ".kernels", source,
                                                  submodule_search_locations=[str(source.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_map_source_kernels()
from .collect import MemoryPlan, collect_statistics, plan_memory
from .config import LoraDAConfig
from .initialize import InitReport, initialize
from .solve import Factors, LoraFactors, solve, solve_sweep
from .statistics import InputStatistics, ModuleStatistics, Statistics

__version__ = "0.1.0"

__all__ = [
    "LoraDAConfig",
    "Statistics",
    "InputStatistics",
    "ModuleStatistics",
    "LoraFactors",
    "Factors",
    "InitReport",
    "collect_statistics",
    "plan_memory",
    "MemoryPlan",
    "solve",
    "solve_sweep",
    "initialize",
]
