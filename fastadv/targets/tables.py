"""Which embedding tables a model has, which modules look each one up, and which of them a method means.

Finding the input embedding (through DDP, DataParallel and PEFT wrappers), the modules that share
one table (T5, BART), tables tied to an output projection (GPT-2), and ``emb_name`` matched as the
snippet matches it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..distributed import unwrap_data_parallel
from ..errors import EmbeddingNotFoundError


def active_copy(wrapper: nn.Module) -> nn.Module | None:
    """The module a PEFT ``ModulesToSaveWrapper`` runs in forward, or None for any other module.

    The wrapper keeps the frozen ``original_module`` beside a trained copy per adapter
    (``modules_to_save[adapter]``) and calls one of them; peft is recognised by these attributes,
    never imported.
    """
    copies, original = getattr(wrapper, "modules_to_save", None), getattr(wrapper, "original_module", None)
    if not isinstance(copies, nn.ModuleDict) or not isinstance(original, nn.Module):
        return None
    adapters = getattr(wrapper, "active_adapters", None) or []
    if getattr(wrapper, "disable_adapters", False) or not adapters or any(a not in copies for a in adapters):
        return original
    return copies[adapters[0]]


def _idle_copies(model: nn.Module) -> set[int]:
    """ids of the modules under PEFT wrappers that forward does not call (the copies not active)."""
    idle: set[int] = set()
    for module in model.modules():
        active = active_copy(module)
        if active is None:
            continue
        running = {id(m) for m in active.modules()}
        idle |= {id(m) for m in module.modules() if m is not module and id(m) not in running}
    return idle


def embedding_modules(model: nn.Module) -> list[tuple[str, nn.Embedding]]:
    """(name, module) of every nn.Embedding forward can call: PEFT's idle copies (the frozen
    ``original_module`` of ``modules_to_save``) are left out."""
    idle = _idle_copies(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding) and id(m) not in idle]


def table_modules(model: nn.Module, weight: torch.Tensor) -> list[tuple[str, nn.Embedding]]:
    """The modules that look up ``weight`` (several when a table is shared, as T5's and BART's are)."""
    return [(n, m) for n, m in embedding_modules(model) if m.weight is weight]


def embedding_like_names(model: nn.Module) -> list[str]:
    """Parameter names that look like embeddings: nn.Embedding weights and names with emb/wte/tok."""
    names = {f"{n}.weight" if n else "weight" for n, _ in embedding_modules(model)}
    names |= {n for n, _ in model.named_parameters() if any(k in n.lower() for k in ("emb", "wte", "tok"))}
    return sorted(names)


def find_input_embedding(model: nn.Module) -> tuple[str, nn.Embedding]:
    """The model's input embedding: ``get_input_embeddings()`` where it has one, else its single nn.Embedding,
    else the one its submodules' ``get_input_embeddings()`` name (a SentenceTransformer around a BertModel).

    Looks through DistributedDataParallel and nn.DataParallel wrappers, and through PEFT's wrappers
    (``get_input_embeddings()`` of a model with ``modules_to_save=["embed_tokens"]`` returns a
    wrapper whose active copy is the embedding forward calls).

    Returns:
        (module name, module). Raises EmbeddingNotFoundError when there is none or several.
    """
    prefix, inner = unwrap_data_parallel(model)
    if inner is model and isinstance(model, nn.DataParallel):
        prefix, inner = "module.", model.module
    if inner is not model:
        name, module = find_input_embedding(inner)
        return prefix + name, module
    candidates = embedding_modules(model)
    named = declared_input_embedding(model, candidates)
    if named is not None:
        return named
    if len(candidates) == 1:
        return candidates[0]
    # A container of one Hugging Face model (sentence-transformers' SentenceTransformer, a custom head):
    # the input embedding that the submodules' get_input_embeddings() name, if they all name the same.
    declared: dict[int, tuple[str, nn.Embedding]] = {}
    for _, submodule in list(model.named_modules())[1:]:
        found = declared_input_embedding(submodule, candidates)
        if found is not None:
            declared[id(found[1])] = found
    if len(declared) == 1:
        return next(iter(declared.values()))
    if not candidates:
        raise EmbeddingNotFoundError(
            f"{type(model).__name__} has no nn.Embedding module and no get_input_embeddings(). "
            "Pass emb_name= with a substring of the parameter to perturb."
        )
    names = ", ".join(f"'{n}'" for n, _ in candidates)
    raise EmbeddingNotFoundError(
        f"{type(model).__name__} has {len(candidates)} nn.Embedding modules ({names}) and no "
        "get_input_embeddings() to say which is the input. Pass emb_name= with a substring of the one to "
        "perturb, e.g. emb_name='word_embeddings'."
    )


def declared_input_embedding(
    model: nn.Module, candidates: list[tuple[str, nn.Embedding]]
) -> tuple[str, nn.Embedding] | None:
    """The one of ``candidates`` (named within the root model) that ``model.get_input_embeddings()`` is or
    runs (PEFT's wrapper, LoRA's base_layer); None without such a getter or a single match."""
    getter = getattr(model, "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        found = getter()
    except (NotImplementedError, AttributeError):  # a model class whose getter its layout does not support
        return None
    if not isinstance(found, nn.Module):
        return None
    inside = {id(m) for m in found.modules()}
    within = [(n, m) for n, m in candidates if id(m) in inside]
    return within[0] if len(within) == 1 else None


def shared_parameter_names(model: nn.Module, param: nn.Parameter) -> list[str]:
    """Every name under which ``param`` appears in ``model`` (more than one when weights are tied)."""
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p is param]


def tied_names(model: nn.Module, weight: nn.Parameter) -> list[str]:
    """The names under which a table's weight serves something other than a lookup (an output
    projection tied to it, as GPT-2's lm_head): weight rows perturbed would perturb those too."""
    lookups = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return [n for n in shared_parameter_names(model, weight) if n not in lookups]


@dataclass(frozen=True)
class EmbeddingTable:
    """A table and the modules whose lookups of it are to be perturbed.

    Attributes:
        name: the weight's name (the first under which the model lists it).
        weight: the table, [V, d].
        modules: (name, module) of the lookups named, in model order.
        every_lookup: whether ``modules`` are all the modules that look the table up (weight rows
            perturb every lookup; output mode can perturb a subset).
    """

    name: str
    weight: nn.Parameter
    modules: tuple[tuple[str, nn.Embedding], ...]
    every_lookup: bool

    @property
    def module_names(self) -> str:
        return ", ".join(f"'{n}'" for n, _ in self.modules)


def input_table(model: nn.Module) -> EmbeddingTable:
    """The input embedding's table with every module that looks it up (T5, BART: the encoder's and the
    decoder's, besides ``shared``, which forward never calls)."""
    module_name, module = find_input_embedding(model)
    modules = table_modules(model, module.weight) or [(module_name, module)]
    names = shared_parameter_names(model, module.weight)
    return EmbeddingTable(names[0] if names else f"{module_name}.weight", module.weight, tuple(modules), True)


def match_parameters(
    model: nn.Module, emb_name: str
) -> tuple[list[EmbeddingTable | tuple[str, nn.Parameter]], list[str]]:
    """The parameters whose name contains ``emb_name``, as the snippet matches them, aliases included.

    A table shared by several modules is listed under each module's name as well (T5's
    'encoder.embed_tokens.weight' is 'shared.weight'): a match through a module's name names that
    module's lookups; a match through the table's own (first) name names all of them.

    Returns:
        (matches in the model's order: a EmbeddingTable for each table, (name, parameter) for any
        other parameter; the names matched that forward never looks up: PEFT's idle copies).
    """
    if not isinstance(emb_name, str) or not emb_name:
        raise EmbeddingNotFoundError(f"emb_name must be a non-empty string or None, found {emb_name!r}.")
    first_names: dict[int, str] = {}
    matched: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first_names.setdefault(id(param), name)
        if emb_name in name:
            matched.setdefault(id(param), (param, []))[1].append(name)
    running = {id(m) for _, m in embedding_modules(model)}
    entries: list[EmbeddingTable | tuple[str, nn.Parameter]] = []
    idle: list[str] = []
    for key, (param, names) in matched.items():
        users = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding) and m.weight is param]
        if not users:
            entries.append((first_names[key], param))
            continue
        modules = [(n, m) for n, m in users if id(m) in running]
        if not modules:
            idle += names
            continue
        named = [(n, m) for n, m in modules if (f"{n}.weight" if n else "weight") in names]
        every = first_names[key] in names or not named
        chosen = modules if every else named
        entries.append(EmbeddingTable(first_names[key], param, tuple(chosen), len(chosen) == len(modules)))
    return entries, idle


def named_tables(model: nn.Module, emb_name: str | None, method: str) -> list[EmbeddingTable]:
    """The tables (with the lookups named) a method acting on embedding outputs perturbs: the input
    embedding's (emb_name None), or each table ``emb_name`` names (see :func:`match_parameters`).
    ``method`` names the caller in the error raised when there is none."""
    if emb_name is None:
        return [input_table(model)]
    entries, idle = match_parameters(model, emb_name)
    tables = [e for e in entries if isinstance(e, EmbeddingTable)]
    if not tables:
        found = ", ".join(f"'{n}.weight'" for n, _ in embedding_modules(model))
        never = f" ({', '.join(repr(n) for n in idle)} are never looked up: PEFT's frozen originals)" if idle else ""
        advice = (
            f"pass a substring of one of {found}, or None for the input embedding"
            if found
            else "the model has no nn.Embedding module: look the table up through one (F.embedding on a bare "
            "parameter has no module output to perturb), or use FGM or PGD, which perturb a parameter's rows"
        )
        raise EmbeddingNotFoundError(
            f"emb_name={emb_name!r} matches no embedding table of {type(model).__name__}{never}. {method} "
            f"perturbs embedding lookups: {advice}."
        )
    return tables


def table_rows(weight: torch.Tensor) -> int:
    """The rows of an embedding table: its vocabulary. Under DeepSpeed ZeRO-3 the parameter is an empty
    placeholder outside the forward (shape (0,)) and ``ds_shape`` is its real shape."""
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A [rows, columns] view of a parameter (1-D: one row), sharing its storage."""
    if t.dim() == 2:
        return t
    if t.dim() == 1:
        return t.view(1, -1)
    return t.view(t.shape[0], -1)
