"""LoRA-DA: data-aware initialisation of LoRA adapters from one pass over calibration data."""
from .collect import collect_statistics
from .config import LoraDAConfig
from .initialize import InitReport, initialize
from .solve import LoraFactors, solve
from .statistics import InputStatistics, ModuleStatistics, Statistics

__version__ = "0.1.0"

__all__ = [
    "LoraDAConfig",
    "Statistics",
    "InputStatistics",
    "ModuleStatistics",
    "LoraFactors",
    "InitReport",
    "collect_statistics",
    "solve",
    "initialize",
]
