"""The key/value cache across transformers releases.

transformers 5.24 renamed the cache argument of ``forward`` and ``generate`` from ``past_key_values`` to ``cache``
(the old name warns and goes away in 5.40), and the outputs' field with it; not every model moved at once. headscope
asks each model's own ``forward`` which name it takes, so its calls are current on every supported release and
never pass a name the model would silently drop.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

NEW, OLD = "cache", "past_key_values"


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model.forward`` (and so ``model.generate``) takes its key/value cache by: ``"cache"`` on models
    of transformers 5.24 and later, ``"past_key_values"`` before."""
    parameters = inspect.signature(model.forward).parameters  # follows the deprecation wrapper to the real forward
    return NEW if NEW in parameters else OLD


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for a call of ``model`` that reads ``cache``."""
    return {cache_keyword(model): cache}


def output_cache(outputs: Any) -> Any:
    """The key/value cache a model call returned (``use_cache=True``), under either release's field name."""
    if NEW in outputs:
        return outputs[NEW]
    return outputs[OLD]
