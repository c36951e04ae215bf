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

__version__ = "0.1.0"

__all__ = ["ModelArgs", "Transformer", "ModelOutput", "LossBreakdown", "MLA", "LatentKVCache",
           "MoE", "BiasBalancer", "max_violation", "sequence_balance_loss", "ParamCount",
           "count_params", "kv_cache_elements_per_token", "__version__"]
