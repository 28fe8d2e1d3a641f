"""A method chosen by its name and plain options: what a YAML file, a command line or an environment variable can
say (``build_adversary(model, "pgd", epsilon="1.0", steps="3")``).

Every keyword of the method's constructor but ``model`` is an option. Options given as strings (from a config or a
command line) are read as the type of the keyword's default: a float, an int (``"3"``, not ``"3.5"``), a bool
(``true``/``false``, ``1``/``0``, ``yes``/``no``), or a string; the method then checks the values as it checks
any argument.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ._common import Adversary
from .consistency import R3F, SMART, VAT
from .fgm import FGM
from .freelb import FreeLB
from .gradient_penalty import GradientPenalty
from .pgd import PGD

# By name: the class, and the options the name fixes (FGSM is FGM with the sign of the gradient).
METHODS: dict[str, tuple[type, dict[str, Any]]] = {
    "fgm": (FGM, {}),
    "fgsm": (FGM, {"norm": "sign"}),
    "pgd": (PGD, {}),
    "freelb": (FreeLB, {}),
    "gradient_penalty": (GradientPenalty, {}),
    "vat": (VAT, {}),
    "smart": (SMART, {}),
    "r3f": (R3F, {}),
}
_ALIASES = {"gp": "gradient_penalty", "gradient-penalty": "gradient_penalty", "gradientpenalty": "gradient_penalty"}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def method_names() -> list[str]:
    """The names :func:`build_adversary` takes (aliases aside: ``gp`` for ``gradient_penalty``)."""
    return list(METHODS)


def method_options(method: str) -> dict[str, Any]:
    """The options of ``method`` (a name :func:`build_adversary` takes) and their defaults."""
    cls, fixed = METHODS[_canonical(method)]
    parameters = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, model
    return {p.name: p.default for p in parameters if p.name not in fixed}


def build_adversary(model: nn.Module, method: str, **options: Any) -> Adversary:
    """The fastadv method named ``method`` on ``model``.

    Args:
        model: the model being trained (the adversary hooks its embedding).
        method: ``fgm``, ``fgsm``, ``pgd``, ``freelb``, ``gradient_penalty`` (or ``gp``), ``vat``, ``smart`` or
            ``r3f``; any case, ``-`` for ``_``.
        **options: the method's keywords (e.g. ``epsilon``, ``alpha``, ``steps``), as values or as strings.

    Raises a ValueError that lists the names, or the method's options, for an unknown one.
    """
    cls, fixed = METHODS[_canonical(method)]
    accepted = method_options(method)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"{cls.__name__} ({method!r}) has no option {', '.join(map(repr, unknown))}: its options are "
            f"{', '.join(f'{name}={default!r}' for name, default in accepted.items())}."
        )
    values = {name: _parsed(name, value, accepted[name], cls.__name__) for name, value in options.items()}
    return cls(model, **fixed, **values)


def _canonical(method: object) -> str:
    if not isinstance(method, str):
        raise TypeError(f"the method is named by a string ({', '.join(METHODS)}), found {type(method).__name__}.")
    name = method.strip().lower().replace("-", "_")
    name = _ALIASES.get(name, _ALIASES.get(method.strip().lower(), name))
    if name not in METHODS:
        raise ValueError(f"no fastadv method is named {method!r}: the names are {', '.join(METHODS)} (gp too).")
    return name


def _parsed(name: str, value: Any, default: Any, method: str) -> Any:
    """``value``, read as the type of ``default`` if it is a string."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    text = value.strip()
    try:
        if isinstance(default, bool):
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        kind = {"bool": "a bool", "int": "an int", "float": "a float"}[type(default).__name__]
        raise ValueError(f"{method}'s option {name} is {kind} (default {default!r}), found {value!r}.") from None
    return value
