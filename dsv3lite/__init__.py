"""dsv3lite: DeepSeek-V3's training ideas, small enough to read and run.

Quick start::

    import torch, dsv3lite
    args = dsv3lite.ModelArgs.tiny()
    model = dsv3lite.Transformer(args)
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    out = model(tokens[:, :-1], tokens[:, 1:])
    print(out.loss.as_dict())
"""

from .accounting import ParamCount, count_params, kv_cache_elements_per_token
from .config import ModelArgs
from .mla import MLA, LatentKVCache
from .model import LossBreakdown, ModelOutput, Transformer
from .moe import BiasBalancer, MoE, max_violation, sequence_balance_loss
from .checkpoint import load_model, save_checkpoint
from .plot import plot_run

_LAZY = {"train": "train", "generate": "generate", "TrainConfig": "train",
         "GenerationResult": "generate"}


def __getattr__(name: str):
    """``dsv3lite.train`` and ``dsv3lite.generate`` are their modules, made callable.

    ``dsv3lite.train(cfg)`` runs :func:`dsv3lite.train.train` and ``dsv3lite.generate(model,
    ids, n)`` runs :func:`dsv3lite.generate.generate`, while ``python -m dsv3lite.train``
    keeps working; importing them lazily keeps ``python -m`` free of runpy warnings.
    """
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return module if name == _LAZY[name] else getattr(module, name)
    raise AttributeError(f"module 'dsv3lite' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = ["ModelArgs", "Transformer", "ModelOutput", "LossBreakdown", "MLA", "LatentKVCache",
           "MoE", "BiasBalancer", "max_violation", "sequence_balance_loss", "ParamCount",
           "count_params", "kv_cache_elements_per_token", "load_model", "save_checkpoint",
           "plot_run", "TrainConfig", "train", "GenerationResult", "generate", "__version__"]
