"""dsv3lite: DeepSeek-V3's training ideas, small enough to read and run.

Quick start::

    import torch, dsv3lite
    args = dsv3lite.ModelArgs.tiny()
    model = dsv3lite.Transformer(args)
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    out = model(tokens[:, :-1], tokens[:, 1:])
    print(out.loss.as_dict())

Training and generation live in their modules: ``from dsv3lite.train import TrainConfig,
train`` and ``from dsv3lite.generate import generate`` (also ``python -m dsv3lite.train``
and ``python -m dsv3lite.generate``).
"""

from .versions import check_torch

check_torch()  # before anything else uses torch: an old one fails here, with the fix

from .accounting import ParamCount, count_params, kv_cache_elements_per_token
from .config import ModelArgs
from .mla import MLA, LatentKVCache
from .model import LossBreakdown, ModelOutput, Transformer, convert_to_fp8
from .moe import BiasBalancer, MoE, RoutingStats, max_violation, sequence_balance_loss
from .checkpoint import load_model, save_checkpoint
from .plot import plot_run

#: The package version (``python -m dsv3lite --version`` prints it).
__version__ = "0.2.0"

__all__ = ["ModelArgs", "Transformer", "ModelOutput", "LossBreakdown", "MLA", "LatentKVCache",
           "MoE", "BiasBalancer", "RoutingStats", "convert_to_fp8", "max_violation",
           "sequence_balance_loss", "ParamCount", "count_params", "kv_cache_elements_per_token",
           "load_model", "save_checkpoint", "plot_run", "__version__"]
