"""A process-wide count of changes to the structure of modules, so that what fastadv reads off a model once
(its parameters, its embeddings) is read again only when the model may have changed.

torch calls its global registration hooks whenever any module registers a parameter or a submodule: an
assignment ``module.weight = nn.Parameter(...)``, ``set_input_embeddings``, ``resize_token_embeddings``, a
PEFT wrapper's new modules. Each bumps the count. Writes that bypass ``Module.__setattr__`` (to
``module._parameters`` directly) are not seen; a data swap (``.to()``, ``.half()``, ``param.data = ...``)
keeps the same Parameter objects and needs no new reading.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

_lock = threading.Lock()
_version = 0
_installed = False


def _bump(module: nn.Module, name: str, value: object) -> None:
    global _version
    _version += 1


def structure_version() -> int:
    """The count of module structure changes in this process so far (hooks installed at the first call)."""
    global _installed
    if not _installed:
        with _lock:
            if not _installed:
                torch.nn.modules.module.register_module_parameter_registration_hook(_bump)
                torch.nn.modules.module.register_module_module_registration_hook(_bump)
                _installed = True
    return _version
