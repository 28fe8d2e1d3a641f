"""What FGM and PGD share: the hooks on the model, the targets by emb_name, one perturbation of them
(gradients, norms, the finite check, apply, rollback, the skip count) and restore."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..distributed import DataParallelBinding, all_reduce_sum
from ..errors import AttackStateError, EmbeddingNotFoundError, FastAdvWarning
from ..ops import Backend, resolve_backend, rows_l2_norm
from ..targets import (
    Gradient,
    LookupEdges,
    LookupGradients,
    OutputTarget,
    RowGradientHooks,
    Step,
    Target,
    TargetMode,
    attach_recorders,
    data_parallel_seen,
    resolve_targets,
    shared_parameter_names,
    tied_targets,
)
from ..targets.structure import structure_version
from ._common import CarriedState, SkipCounter, check_emb_name
from ._finite import FiniteGuard


class EmbeddingAttack(CarriedState):
    """Base of the attacks that perturb the embedding along its gradient and restore it afterwards.

    It hooks every nn.Embedding of ``model`` at construction (to record the rows each batch
    touches), resolves ``emb_name`` to targets once per name, and restores what was perturbed.
    The hooks hold the recorders, not this object: when it is collected, they come off the model.

    Under DDP the process group comes from the wrapper given (``model`` is, or holds, the
    DistributedDataParallel module), or from :meth:`bind_data_parallel`, or else from the forward
    pass: a lookup inside a DDP forward names its wrapper, which is bound before the next attack,
    so ``FGM(model)`` then ``DDP(model)``, or ``FGM(ddp_model.module)``, perturb the rows of every
    rank's batch as well.
    """

    def __init__(self, model: nn.Module, emb_name: str | None, target: TargetMode, share_rows: bool) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} needs the nn.Module being trained, found {type(model).__name__}.")
        if target not in ("auto", "weight", "output"):
            raise ValueError(f"target must be 'auto', 'weight' or 'output', found {target!r}.")
        self.model = model
        self.emb_name = check_emb_name(emb_name)
        self.target: TargetMode = target
        self.share_rows = bool(share_rows)
        self.backend: Backend | None = None  # the backend of the last attack()
        self._data_parallel = DataParallelBinding(model)
        self._recorders = attach_recorders(model)
        self._embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]  # all the recorders watch
        self._outputs: dict[object, OutputTarget] = {}  # one set of output hooks per table and modules
        self._edges: dict[int, LookupEdges] = {}  # lookups as autograd edges, for methods that need dL/de
        # Every later pass into a dense .grad adds its gradient as rows (see fastadv.targets.row_gradients).
        self._row_gradients = {"hooks": RowGradientHooks(model)}
        # A state dict taken while the weight is perturbed holds the clean rows.
        self._state_dict_hook = {"hook": model.register_state_dict_post_hook(CleanStateDict(self))}
        self._detach = weakref.finalize(
            self, _remove_hooks, self._recorders, self._outputs, self._edges, self._row_gradients, self._state_dict_hook
        )
        self._targets_by_name: dict[str | None, list[Target]] = {}
        self._table_names: dict[int, str] = {}  # id of each resolved table: its name in the model
        self._checked_at: dict[str | None, int] = {}  # by emb_name: the structure version its tables were checked at
        self._attacked: list[tuple[Target, object]] | None = None  # (target, its perturbation's handle)
        self._skipped = SkipCounter()
        # A step whose passes from the attack to the restore end with a non-finite loss or gradient gives .grad zeros.
        self._guard = FiniteGuard(model, self._skipped)
        self._warned_tied = False

    @property
    def skipped_steps(self) -> int:
        """Attacks skipped because the gradient they read held NaN/Inf, or whose steps ended (at the restore) with
        a non-finite loss or gradient, every ``.grad`` then zeroed (the NaN rule, ``fastadv.methods._finite``).
        Reading it syncs."""
        return int(self._skipped)

    @property
    def chosen_targets(self) -> dict[str, str]:
        """Where the perturbation of each table lives, by the table's parameter name: ``"weight"`` (its rows,
        restored afterwards) or ``"output"`` (added to its lookups' output): what ``target="auto"`` chose, for
        the constructor's ``emb_name``."""
        return {t.name: "output" if isinstance(t, OutputTarget) else "weight" for t in self._targets(self.emb_name)}

    def remove_hooks(self) -> None:
        """Detach the hooks from the model now (done anyway when this object is collected)."""
        self._detach()
        self._targets_by_name.clear()

    def bind_data_parallel(self, model: nn.Module) -> None:
        """Use the DistributedDataParallel wrapper of ``model``, made after this object was built (by a
        Trainer or ``accelerator.prepare``): the rows of every rank's batch are then perturbed, as when
        the wrapper is given at construction. A model with no DDP wrapper changes nothing.

        Optional: the first forward pass through the wrapper binds it anyway. Calling this before that
        pass matters only to ``fgm.step(..., clean_no_sync=True)``, whose first clean pass otherwise runs
        with the gradients all-reduced (same numbers, one more all-reduce).
        """
        wrapper = DataParallelBinding(model).wrapper
        if wrapper is None or wrapper is self._data_parallel.wrapper:
            return
        if self._attacked is not None:
            raise AttackStateError("bind_data_parallel() called during an attack: call restore() first.")
        self._bind(wrapper)

    def restore(self, emb_name: str | None = None) -> None:
        """Put back, bit for bit, the rows the attack changed (output mode: stop adding the delta).

        ``emb_name``, if given, must name the parameters that the attack perturbed.
        """
        if self._attacked is None:
            raise AttackStateError("restore() called without a matching attack(): there is nothing to restore.")
        if emb_name is not None:
            asked = {id(t.param) for t in self._targets(emb_name)}
            if asked != {id(t.param) for t, _ in self._attacked}:
                attacked = ", ".join(t.name for t, _ in self._attacked)
                raise EmbeddingNotFoundError(
                    f"restore(emb_name={emb_name!r}) names other parameters than attack() perturbed ({attacked}); "
                    "they are still perturbed. Call restore() with the attack's emb_name, or with none."
                )
        for target, perturbation in self._attacked:
            target.check_restorable(perturbation)
        remaining = list(self._attacked)
        while remaining:
            target, perturbation = remaining[0]
            try:
                target.restore(perturbation)
            except BaseException:
                self._attacked = remaining  # still perturbed, their saved rows kept: restore() can be called again
                raise
            remaining.pop(0)
        self._attacked = None
        self._guard.disarm()

    # ------------------------------------------------------------ internals

    def _bind(self, wrapper: nn.Module) -> None:
        if self._data_parallel.bind(wrapper):
            self._targets_by_name.clear()  # targets take the group when they are resolved again

    def _bind_data_parallel_seen(self) -> None:
        """Bind the DDP wrapper whose forward pass looked a table up, if it is not the one bound (the
        model was wrapped after this object was built, or this object was built on ``ddp.module``)."""
        if self._attacked is not None:  # the targets of an attack in progress stay as they are
            return
        for wrapper in data_parallel_seen(self._embeddings):
            if wrapper is not self._data_parallel.wrapper:
                self._bind(wrapper)
                return

    def _targets(self, emb_name: str | None) -> list[Target]:
        check_emb_name(emb_name)  # before it is a dict key: a list would raise 'unhashable'
        if not self._detach.alive:  # remove_hooks() ran: nothing records the lookups now; say so, not "call backward"
            kind = type(self).__name__
            raise RuntimeError(f"{kind}'s hooks were removed by remove_hooks(): create a new {kind} to train with it.")
        self._bind_data_parallel_seen()
        targets = self._targets_by_name.get(emb_name)
        version = structure_version()
        if targets is not None:
            if self._checked_at.get(emb_name) != version:  # no module changed since the last check: none to make
                self._check_tables_in_place(targets)
        else:
            targets = resolve_targets(
                self.model,
                emb_name,
                self._recorders,
                self.target,
                self.share_rows,
                self._outputs,
                self._data_parallel.group,
                self._data_parallel.weight_rows_refusal,
            )
            self._targets_by_name[emb_name] = targets
            self._warn_if_tied(targets)
            # Where the model holds each table now: a table replaced later is no longer there.
            self._table_names.update(
                {id(t.param): t.name for t in targets if _parameter_at(self.model, t.name) is t.param}
            )
        self._checked_at[emb_name] = version
        return targets

    def _check_tables_in_place(self, targets: list[Target]) -> None:
        """Refuse to attack a table the model no longer holds (its embedding replaced since it was hooked)."""
        for target in targets:
            name = self._table_names.get(id(target.param))
            if name is not None and _parameter_at(self.model, name) is not target.param:
                kind = type(self).__name__
                raise EmbeddingNotFoundError(
                    f"The model no longer holds the table {kind} hooked as '{name}': its embedding was replaced "
                    f"after {kind} was built (set_input_embeddings, resize_token_embeddings, a new module), so the "
                    f"model never looks the hooked table up. Build {kind} again on the model as it is now; "
                    "nothing was perturbed."
                )

    def _perturb(
        self,
        targets: list[Target],
        size: float,
        apply: Callable[[Target, Gradient, Step, Backend], object],
        lookups: dict[int, LookupGradients] | None = None,
        average_over_ranks: bool = False,
        skip_zero: bool = True,
    ) -> None:
        """One perturbation of every target: their gradients (``.grad``, the captured dL/de, or
        ``lookups`` by target id), their norms, then ``apply(target, gradient, Step(size, norm, ok), backend)``,
        which returns the perturbation's handle.

        A non-finite norm anywhere skips the whole step on the device (``ok`` False for every target:
        nothing moves) and is counted; ``skip_zero`` also leaves a target with a zero gradient as it is.
        Should ``apply`` raise on the round's first perturbation, what it had perturbed is restored.
        """
        # FSDP2 tables know their group from the parameter; the warning is for ranks with no group at all.
        self._data_parallel.warn_if_unwrapped([t.group for t in targets], stacklevel=4)
        self._data_parallel.check_knows_engine([t.param for t in targets], f"'{targets[0].name}'")
        backend = resolve_backend(targets[0].param.device)
        device = targets[0].param.device
        before = dict(self._attacked or [])  # a PGD round in progress: each target's perturbation so far
        gradients = [
            target.gradient(
                backend, None if lookups is None else lookups[id(target)], average_over_ranks, before.get(target)
            )
            for target in targets
        ]
        self.backend = backend
        norms = torch.stack([gradient_norm(g, backend).to(device) for g in gradients])
        finite = torch.isfinite(norms).all()
        done: list[tuple[Target, object]] = []
        try:
            for target, gradient, norm in zip(targets, gradients, norms, strict=True):
                ok = finite & (norm > 0) if skip_zero else finite
                done.append((target, apply(target, gradient, Step(size, norm, ok), backend)))
        except BaseException:
            for target, perturbation in done if not before else ():
                target.restore(perturbation)
            raise
        self._skipped.add(~finite)
        self._attacked = done
        self._guard.arm()

    def _warn_if_tied(self, targets: list[Target]) -> None:
        for target, names in tied_targets(self.model, targets):
            if self._warned_tied:
                return
            self._warned_tied = True
            warnings.warn(
                f"'{target.name}' is tied to {', '.join(repr(n) for n in names if n != target.name)} (input and "
                "output embeddings share one matrix). fastadv perturbs only the rows of the batch's tokens, "
                "with the norm taken over those rows; the copied snippet perturbs every row of the shared "
                "matrix, output projection included, so the numbers differ from the snippet on this model. "
                "target='output' (or 'auto') perturbs the input lookup alone.",
                FastAdvWarning,
                stacklevel=4,
            )


class CleanStateDict:
    """The model's state-dict hook: while an attack has written the weight, the state dict (a checkpoint, an EMA
    update) gets each written parameter as it was before the attack, and a warning says so; so does a
    ``copy.deepcopy`` of the model (an EMA or best-model copy). Holds the attack weakly; a copied model (deepcopy,
    pickle) holds an inert one."""

    def __init__(self, attack: EmbeddingAttack | None) -> None:
        self._attack = None if attack is None else weakref.ref(attack)

    def __deepcopy__(self, memo: dict) -> CleanStateDict:
        # Reached while the model is deep-copied (the hook is in its __dict__): the copy of each written parameter
        # is made here, from the clean rows, and put in the memo, where deepcopy takes it from; one copied before
        # this hook (a parameter of the model itself, not of a submodule) gets the clean rows written into it.
        attack = None if self._attack is None else self._attack()
        if attack is not None and attack._attacked is not None:
            cleaned = []
            for target, perturbation in attack._attacked:
                clean = target.clean_value(perturbation)
                if clean is None:
                    continue
                param = target.param
                if id(param) in memo:
                    with torch.no_grad():
                        memo[id(param)].copy_(clean)
                else:  # as Parameter.__deepcopy__ makes it, from the clean value
                    memo[id(param)] = type(param)(clean, param.requires_grad)
                cleaned.append(target.name)
            if cleaned:
                warnings.warn(
                    f"copy.deepcopy() of the model was taken between {type(attack).__name__}'s attack and "
                    f"restore(): the copy holds {', '.join(cleaned)} as before the attack (the clean rows), as "
                    "state_dict() would, not the perturbed weights the model holds now. Copy after restore().",
                    FastAdvWarning,
                    stacklevel=2,
                )
        return CleanStateDict(None)

    def __reduce__(self) -> tuple:
        return (CleanStateDict, (None,))

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        attack = None if self._attack is None else self._attack()
        if attack is None or attack._attacked is None:
            return
        cleaned = []
        for target, perturbation in attack._attacked:
            clean = target.clean_value(perturbation)
            if clean is None:
                continue
            for name in shared_parameter_names(module, target.param):
                if prefix + name in state_dict:
                    state_dict[prefix + name] = clean
                    cleaned.append(prefix + name)
        if cleaned:
            warnings.warn(
                f"state_dict() was taken between {type(attack).__name__}'s attack and restore(): it holds "
                f"{', '.join(cleaned)} as before the attack (the clean rows), not the perturbed weights the model "
                "holds now. Take checkpoints after restore().",
                FastAdvWarning,
                stacklevel=3,
            )


def _remove_hooks(*registries: dict) -> None:
    for registry in registries:
        for hooked in registry.values():
            hooked.remove()
        registry.clear()


def gradient_norm(gradient: Gradient, backend: Backend) -> torch.Tensor:
    """fp32 0-dim: the L2 norm of a target's gradient over its rows (every rank's terms where
    ``gradient.norm_group`` holds the rest: an FSDP2 shard, per-position deltas under DDP)."""
    norm = rows_l2_norm(gradient.values, gradient.rows, backend)
    if gradient.norm_group is None:
        return norm
    return all_reduce_sum(norm.square().reshape(1), gradient.norm_group).sqrt().reshape(())


def _parameter_at(model: nn.Module, name: str) -> nn.Parameter | None:
    """The parameter the model holds under ``name`` now, or None."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None
