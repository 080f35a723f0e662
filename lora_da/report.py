"""What the solve did: ``SolveReport`` (``Factors.report``), per module shape and per module, with
its JSON round trip (the report travels between the ranks of a process group as JSON)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional


@dataclass
class Diagnostics:
    """What a module's chosen subspace is (``subspaces.diagnose``)."""

    input_energy: float  # e(A) = tr(A Z A^T) / tr(A A^T) / (tr Z / n): input energy along lora_A, 1 for a random A
    captured_share: float  # ||Delta_hat V||_F^2 / ||Delta_hat||_F^2
    objective: float  # tr(V^T Omega V), the value the subspace minimises


@dataclass
class ModuleReport:
    """How one module was solved."""

    damping: float  # of its input factor: the config's, or the rounding floor of Z's sums (``InputFactors``)
    token_space: Optional[int] = None  # s, where solved in the span of its input's s tokens (``token_space``)
    iterations: Optional[int] = None  # randomized solver: iterations of its eigenvectors (largest over betas)
    residual: Optional[float] = None  # randomized solver: their final relative residual (largest over betas)
    converged: bool = True  # the eigenvectors reached solver_tolerance within solver_max_iterations
    sigma_iterations: Optional[int] = None  # randomized solver: iterations of sigma (normalize_delta)
    sigma_change: Optional[float] = None  # the last relative change of sigma^2
    sigma_converged: bool = True  # sigma reached its tolerance within solver_max_iterations
    diagnostics: Optional[Diagnostics] = None  # a single solve's (a sweep's sets share one report: none)

    @classmethod
    def from_json(cls, data: dict) -> "ModuleReport":
        diagnostics = data.get("diagnostics")
        return cls(**{**data, "diagnostics": None if diagnostics is None else Diagnostics(**diagnostics)})


def _largest(values: Iterable[Optional[float]]):
    """The largest of the values that are not None; None when there is none."""
    present = [value for value in values if value is not None]
    return max(present) if present else None


@dataclass
class ShapeReport:
    """The modules of one shape ("m x n, r=R", R the largest rank asked for) and their solver."""

    solver: str  # "exact" or "randomized" (``LoraDAConfig.solver`` resolved for this n)
    modules: Dict[str, ModuleReport] = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return all(m.converged and m.sigma_converged for m in self.modules.values())

    @property
    def iterations(self) -> Optional[int]:
        """The largest iteration count of the modules solved by the randomized solver (None: none was)."""
        return _largest(m.iterations for m in self.modules.values())

    @property
    def residual(self) -> Optional[float]:
        return _largest(m.residual for m in self.modules.values())

    @property
    def sigma_iterations(self) -> Optional[int]:
        return _largest(m.sigma_iterations for m in self.modules.values())

    @property
    def sigma_change(self) -> Optional[float]:
        return _largest(m.sigma_change for m in self.modules.values())

    @property
    def unconverged(self) -> Dict[str, float]:
        """Module -> residual, of the modules whose eigenvectors stopped at solver_max_iterations."""
        return {name: m.residual for name, m in self.modules.items() if not m.converged}

    @property
    def sigma_unconverged(self) -> Dict[str, float]:
        """Module -> last change of sigma^2, of the modules whose sigma stopped at solver_max_iterations."""
        return {name: m.sigma_change for name, m in self.modules.items() if not m.sigma_converged}

    @property
    def dampings(self) -> Dict[str, float]:
        return {name: m.damping for name, m in self.modules.items()}

    @property
    def token_space(self) -> Dict[str, int]:
        """Module -> s, of the modules solved in the span of their input's s tokens."""
        return {name: m.token_space for name, m in self.modules.items() if m.token_space is not None}

    @property
    def diagnostics(self) -> Dict[str, Diagnostics]:
        return {name: m.diagnostics for name, m in self.modules.items() if m.diagnostics is not None}


@dataclass
class SolveReport:
    """Per module shape ("m x n, r=R"), how its modules were solved."""

    shapes: Dict[str, ShapeReport] = field(default_factory=dict)

    def shape(self, key: str, solver: str) -> ShapeReport:
        """The entry of shape ``key``, made (for ``solver``) at its first call."""
        return self.shapes.setdefault(key, ShapeReport(solver))

    def modules(self) -> Dict[str, ModuleReport]:
        """Every module's entry."""
        return {name: m for entry in self.shapes.values() for name, m in entry.modules.items()}

    def unconverged(self) -> Dict[str, float]:
        return {name: value for entry in self.shapes.values() for name, value in entry.unconverged.items()}

    def sigma_unconverged(self) -> Dict[str, float]:
        return {name: value for entry in self.shapes.values() for name, value in entry.sigma_unconverged.items()}

    def diagnostics(self) -> Dict[str, Diagnostics]:
        """Module -> its diagnostics, where the solve made them."""
        return {name: value for entry in self.shapes.values() for name, value in entry.diagnostics.items()}

    def to_json(self) -> dict:
        """{shape: {"solver", "modules": {module: its fields}}}: JSON types only."""
        return {key: {"solver": entry.solver, "modules": {name: asdict(m) for name, m in entry.modules.items()}}
                for key, entry in self.shapes.items()}

    @classmethod
    def from_json(cls, data: dict) -> "SolveReport":
        return cls({key: ShapeReport(entry["solver"], {name: ModuleReport.from_json(m)
                                                       for name, m in entry["modules"].items()})
                    for key, entry in data.items()})

    @classmethod
    def union(cls, parts: List["SolveReport"]) -> "SolveReport":
        """One report of the reports of disjoint sets of modules (each rank's share of a solve)."""
        out = cls()
        for part in parts:
            for key, entry in part.shapes.items():
                out.shape(key, entry.solver).modules.update(entry.modules)
        return out
