"""fastadv as an axolotl plugin: one YAML key makes axolotl's Trainer adversarial.

    plugins:                                   # where axolotl does not load installed plugins by itself
      - fastadv.integrations.axolotl.FastAdvPlugin
    adversarial_method: fgm
    adversarial_epsilon: 1.0

The keys are :mod:`fastadv.integrations.from_config`'s (``adversarial_method``, ``adversarial_epsilon``,
``adversarial_options``, ``adversarial_start_step``); a config without ``adversarial_method`` trains plainly.
fastadv registers the plugin under the ``axolotl.plugins`` entry point too. After axolotl builds its
Trainer, :meth:`FastAdvPlugin.post_trainer_create` makes it adversarial
(:func:`fastadv.integrations.hf.make_adversarial`), which keeps axolotl's Trainer class and its contexts;
the counters axolotl keeps in ``compute_loss`` count the clean pass only.

Importing this module needs axolotl (Python >= 3.12). Its logic is tested in CI against a real
``transformers.Trainer`` (``tests/test_integrations.py``), and inside axolotl 0.21.0 by ``bench/axolotl_run.py``
(the key's final weights equal ``trainer_cls:``'s bitwise; no key, axolotl's without fastadv).
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel

from .from_config import make_adversarial_from_config


class FastAdvArgs(BaseModel):
    """The YAML keys the plugin adds to axolotl's config."""

    adversarial_method: str | None = None
    adversarial_epsilon: float | None = None
    adversarial_options: dict[str, Any] | None = None
    adversarial_start_step: int | None = None


class FastAdvPlugin(BasePlugin):
    """Makes the Trainer axolotl built adversarial when the config names ``adversarial_method``."""

    def get_input_args(self) -> str:
        return "fastadv.integrations.axolotl.FastAdvArgs"

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        make_adversarial_from_config(cfg, trainer)
