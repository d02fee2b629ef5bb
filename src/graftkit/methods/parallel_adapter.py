"""Parallel adapter: the unified view's scaled parallel adapter on the feed-forward sublayer.

He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning" (ICLR):
the feed-forward sublayer's output gets a bottleneck of its *input* added, scaled by ``s``:

    FFN'(x) = FFN(x) + s * (W_up f(W_down x + b_down) + b_up),      f = ReLU

so the adapter runs beside the sublayer instead of after it. ``s`` is fixed, not trained;
the paper's best FFN variant ("scaled PA", also the FFN half of its MAM adapter) uses
``s = 4`` (the authors' jxhe/unify-parameter-efficient-tuning, exps/run_xsum.sh:
``ffn_adapter_scalar="4"``, with a zero up-projection, "lora" init). ``x`` is what enters the
block's ``ffn_in`` module (BERT ``intermediate``; Llama/GPT-2 ``mlp``) and the sum lands on the
output of ``ffn_out`` (BERT ``output.dense``, before dropout and the residual LayerNorm;
Llama/GPT-2 ``mlp``). See :mod:`graftkit.methods.bottleneck` for the shared machinery and the
``connected`` / ``shared`` options.
"""
from __future__ import annotations

from pydantic import Field

from ..registry import METHODS
from .bottleneck import BottleneckConfig, BottleneckMethod


class ParallelAdapterConfig(BottleneckConfig):
    #: the fixed factor ``s`` on the adapter's output (He et al.'s scaled parallel adapter: 4)
    scaling: float = Field(default=4.0, gt=0)


@METHODS.register("parallel_adapter")
class ParallelAdapter(BottleneckMethod):
    name = "parallel_adapter"
    config_cls = ParallelAdapterConfig
    roles = ("ffn_out",)
    parallel = True
