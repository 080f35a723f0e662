"""Hyperparameters of LoRA-DA (see docs: ALGORITHM.md for the symbols)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

TOKEN_MASKS = ("attention", "labels", "all")
OUTPUT_FISHERS = ("diagonal", "sequence_lowrank")
SOLVERS = ("auto", "exact", "randomized")
BACKENDS = ("auto", "torch", "triton", "cuda")
SMALL_EIGH_PLACES = ("host", "device")
INPUT_FACTOR_DTYPES = ("auto", "float32", "float64", "mixed")
DAMPING_MODES = ("absolute", "relative")


@dataclass(frozen=True)
class LoraDAConfig:
    """Settings of one LoRA-DA initialisation.

    Paper symbols: ``rank`` = r, ``bias_weight`` = alpha, ``variance_weight`` = beta,
    ``damping`` = lambda, ``gamma`` = gamma, ``population_size`` = N. ``input_factor_dtype``: how
    Z is summed. ``float64``: fp64 products and sums (through PyTorch where the kernels run).
    ``float32``: fp32 sums (the input's dtype when wider); their rounding noise, about
    eps32 * ||Z||, can exceed lambda, and the solve then damps each input at its rounding floor
    instead (see ``input_factors.rounding_floor``). ``mixed``: fp64 sums; where the kernels run on
    fp16 or bf16 inputs (whose products fp32 holds exactly), each input's counted rows are held in
    host memory until they number over twice its n features (an input that never does, whose Z is
    singular or nearly so, gets fp64 products through PyTorch), then the kernels sum the massive
    features' rows and columns in fp64 and every other entry as fp32 tile sums added into fp64
    every few tokens (the Triton kernel) or every call (the CUDA extension; ``kernels.massive``);
    elsewhere as ``float64``. ``auto``: ``mixed`` where the Triton kernel runs, ``float64``
    elsewhere (CPUs, the CUDA extension, fp32 models): RESULTS.md, "Input factor schemes",
    measures each against fp64 sums. ``buffer_tokens``: the
    tokens of each distinct input gathered across micro-batches before the statistics op runs on
    them as one chunk (fewer where the buffers would exceed an eighth of the accumulators' bytes or
    what ``max_memory`` leaves; 0: the op runs on each micro-batch). ``solver_mixed_precision``:
    the randomized solver applies Omega to its search directions in fp32 and checks convergence in
    fp64 (False: fp64 throughout). ``solver_small_eigh``: on GPUs, where the solvers' small
    eigenproblems above 32 x 32 run: ``host`` threads (torch's CUDA eigh solves a batch of them
    one matrix at a time) or the ``device``. ``damping_mode``: ``absolute`` (the paper's) adds
    lambda to both Kronecker factors; ``relative`` adds lambda * tr(Z) / n to each input factor
    Z [n, n] and lambda * mean(y) to each output factor y [m] (lambda where that scale is 0), which
    bounds how far Zd^-1 can whiten an input: by 1 / lambda against its mean eigenvalue.

    The authors' further options (ALGORITHM.md; each default leaves the method unchanged):
    ``output_damping_ratio`` rho damps the output factor by max(rho * median(y), tiny) instead of
    lambda; ``delta_normalization_power`` p and ``delta_normalization_reference`` rho_Delta divide
    Delta by s = sigma^p * rho_Delta^(1 - p) instead of sigma; ``normalize_variance_guidance``
    rescales the variance term to the Frobenius norm of the bias term before beta weighs it;
    ``balance_factors`` splits B = Delta_hat V = U S W^T as B = U S^1/2, A = S^1/2 W^T V^T.
    """

    rank: int = 8
    target_modules: Optional[Union[str, Sequence[str]]] = None
    bias_weight: float = 1.0
    variance_weight: float = 0.03
    damping: float = 1e-6
    damping_mode: str = "absolute"
    gamma: float = 1024.0
    population_size: Optional[int] = None
    normalize_delta: bool = True
    token_mask: str = "attention"
    output_fisher: str = "diagonal"
    input_factor_dtype: str = "auto"
    buffer_tokens: int = 4096
    shard_statistics: bool = False
    deterministic: bool = False
    num_samples: Optional[int] = None
    solver: str = "auto"
    solver_tolerance: float = 1e-7
    solver_max_iterations: int = 200
    solver_oversampling: int = 8
    solver_mixed_precision: bool = True
    solver_small_eigh: str = "host"
    backend: str = "auto"
    seed: int = 0
    balance_factors: bool = False
    output_damping_ratio: Optional[float] = None
    normalize_variance_guidance: bool = False
    delta_normalization_power: float = 1.0
    delta_normalization_reference: float = 1.0

    def __post_init__(self):
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        _check_choice("token_mask", self.token_mask, TOKEN_MASKS)
        _check_choice("output_fisher", self.output_fisher, OUTPUT_FISHERS)
        _check_choice("solver", self.solver, SOLVERS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("solver_small_eigh", self.solver_small_eigh, SMALL_EIGH_PLACES)
        _check_choice("input_factor_dtype", self.input_factor_dtype, INPUT_FACTOR_DTYPES)
        _check_choice("damping_mode", self.damping_mode, DAMPING_MODES)
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.bias_weight < 0 or self.variance_weight < 0:
            raise ValueError(
                f"bias_weight and variance_weight must be >= 0, got {self.bias_weight} and {self.variance_weight}"
            )
        if self.bias_weight == 0 and self.variance_weight == 0:
            raise ValueError("bias_weight and variance_weight cannot both be 0: the guidance matrix would be 0")
        if not self.damping > 0:
            raise ValueError(f"damping must be > 0, got {self.damping}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if not 0 < self.solver_tolerance < 1:
            raise ValueError(f"solver_tolerance must be in (0, 1), got {self.solver_tolerance}")
        if self.solver_max_iterations < 1 or self.solver_oversampling < 0:
            raise ValueError("solver_max_iterations must be >= 1 and solver_oversampling >= 0")
        if self.output_damping_ratio is not None and not self.output_damping_ratio >= 0:
            raise ValueError(f"output_damping_ratio must be >= 0 or None, got {self.output_damping_ratio}")
        if not 0 < self.delta_normalization_power <= 2:
            raise ValueError(f"delta_normalization_power must be in (0, 2], got {self.delta_normalization_power}")
        if not self.delta_normalization_reference > 0:
            raise ValueError(f"delta_normalization_reference must be > 0, got {self.delta_normalization_reference}")
        if self.normalize_variance_guidance and self.bias_weight == 0 and self.variance_weight > 0:
            raise ValueError("normalize_variance_guidance scales the variance term to the bias term's norm: "
                             "it needs bias_weight > 0")
        if self.deterministic and self.backend not in ("auto", "torch"):
            raise ValueError(f"deterministic=True runs the plain PyTorch ops; it cannot use backend={self.backend!r}")
        if not (isinstance(self.buffer_tokens, int) and self.buffer_tokens >= 0):
            raise ValueError(f"buffer_tokens must be an integer >= 0, got {self.buffer_tokens!r}")
        for field in ("population_size", "num_samples"):
            value = getattr(self, field)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{field} must be a positive integer or None, got {value!r}")

    def replace(self, **overrides) -> "LoraDAConfig":
        """A copy with ``overrides`` applied; unknown names are an error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown LoraDAConfig field(s) {unknown}; known fields: {sorted(known)}")
        return dataclasses.replace(self, **overrides)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")


def resolve_config(cfg: Optional[LoraDAConfig], overrides: dict) -> LoraDAConfig:
    """``cfg`` (default config when None) with keyword ``overrides`` applied."""
    cfg = LoraDAConfig() if cfg is None else cfg
    return cfg.replace(**overrides) if overrides else cfg
