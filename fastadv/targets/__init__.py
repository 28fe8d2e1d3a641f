"""Where a perturbation lives: the touched rows of an embedding weight, or the embedding's output.

One module per concern, each importing only those listed before it:

    tables.py         which tables a model has, which modules look each up, what emb_name names
    scale.py          how a module's output relates to the raw lookup (embed_scale)
    row_gradients.py  passes into a dense .grad add the table's gradient as rows
    hook.py           the one forward hook per embedding module, serving everything that watches it
    gradients.py      a table's gradient from its lookups' dL/de, per id or per position
    base.py           what a target gives a method: a Gradient value, a perturbation handle
    lookup_edges.py   recent lookups as autograd edges (dL/de for PGD's inner passes, the penalty)
    recorder.py       which rows of a table can hold a gradient
    weight.py         weight mode: rows perturbed in place and restored bit for bit
    output.py         output mode: a delta added to the lookups' output in forward hooks
    resolve.py        choosing between them for emb_name and target=

This layer decides nothing about the perturbation's size: methods pass epsilon, the norm and the
skip flag.
"""

from .base import Gradient, Step, Target
from .gradients import LookupGradients, gradient_rows
from .hook import RowGradientHooks, data_parallel_seen, subscribe
from .lookup_edges import LookupEdges
from .output import OutputTarget
from .recorder import LookupRecorder, attach_recorders
from .resolve import TargetMode, resolve_targets, tied_targets
from .row_gradients import ROW_GRADIENTS_VARIABLE
from .scale import lookup_scale, on_output, raw_gradient
from .tables import EmbeddingTable, embedding_modules, named_tables, shared_parameter_names, table_modules
from .weight import WeightTarget

__all__ = [
    "ROW_GRADIENTS_VARIABLE",
    "EmbeddingTable",
    "Gradient",
    "LookupEdges",
    "LookupGradients",
    "LookupRecorder",
    "OutputTarget",
    "RowGradientHooks",
    "Step",
    "Target",
    "TargetMode",
    "WeightTarget",
    "attach_recorders",
    "data_parallel_seen",
    "embedding_modules",
    "gradient_rows",
    "lookup_scale",
    "named_tables",
    "on_output",
    "raw_gradient",
    "resolve_targets",
    "shared_parameter_names",
    "subscribe",
    "table_modules",
    "tied_targets",
]
