"""LoRA-DA: data-aware initialisation of LoRA adapters from one pass over calibration data."""
from .collect import collect_statistics
from .comparison import Comparison, Run, Start, compare
from .memory import MemoryPlan, plan_memory
from .config import LoraDAConfig
from .peft_adapters import InitReport, initialize
from .report import ModuleReport, ShapeReport, SolveReport
from .solver import solve, solve_sweep
from .subspaces import Factors, LoraFactors
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
    "SolveReport",
    "ShapeReport",
    "ModuleReport",
    "collect_statistics",
    "plan_memory",
    "MemoryPlan",
    "solve",
    "solve_sweep",
    "initialize",
    "compare",
    "Comparison",
    "Run",
    "Start",
]
