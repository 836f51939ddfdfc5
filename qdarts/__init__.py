"""qdarts: differentiable mixed-precision neural architecture search (gradient QDARTS).

The search layer on top of ``qdarts_kernels``: quantized DARTS ops (EdMIPS composite convolutions),
the PC-DARTS supernet with alpha, beta, gamma_a, gamma_w, the BitOps cost model, the search loop,
derivation of the genotype with its bits, and retraining with fixed bits. Command line: ``qdarts``.
"""

from .cost import ExpectedCost, network_cost
from .derive import derive_genotype
from .evalnet import EvalNetwork
from .genotype import PRIMITIVES, Genotype, load_genotype
from .search import SearchConfig, run_search
from .supernet import SearchNetwork, SupernetConfig
from .train import TrainConfig, run_train

__version__ = "0.1.0"
__all__ = [
    "PRIMITIVES",
    "Genotype",
    "load_genotype",
    "SearchNetwork",
    "SupernetConfig",
    "ExpectedCost",
    "network_cost",
    "derive_genotype",
    "EvalNetwork",
    "SearchConfig",
    "run_search",
    "TrainConfig",
    "run_train",
]
