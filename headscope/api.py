"""The front door for Python: one call per analysis, and any head's pattern after the fact.

    import headscope
    result = headscope.run("sinks", "smollm2-135m")
    result.plot("sink_score")
    result.top_heads("sink_score")

    patterns = headscope.patterns_of("smollm2-135m", "The cat sat on the mat.", heads=[(3, 2), (5, 0)])
    patterns.plot(3, 2)

:func:`run` goes through the runner's own code (:func:`headscope.runner.run_analysis`), as ``headscope analyze``
does, so both give the same numbers for the same model, input, seed and parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import nn

from headscope import plotting, registry
from headscope.capture.engine import Scope
from headscope.capture.reducers import FullMaps
from headscope.errors import HeadscopeError
from headscope.models.load import Loaded, describe, kind_of, load
from headscope.probes import decoding
from headscope.probes import text as probe_text
from headscope.progress import Notebook, Plain, Reporter, in_jupyter, reporting
from headscope.results import AnalysisResult

Model = str | Path | Loaded | nn.Module | tuple | None
DEFAULT_PATTERN_GIB = 0.25
DECODED_TOKENS = 16


def run(
    analysis: str,
    model: Model = None,
    text: str | None = None,
    *,
    input: str | Path | None = None,  # the CLI's --input
    max_tokens: int | None = None,
    seed: int = 0,
    processor: Any = None,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool | None = None,
    **params: Any,
) -> AnalysisResult:
    """Run one analysis and return its result.

    Args:
        analysis: a registered analysis (``headscope.list_analyses()``; ``headscope analyses`` lists them with
            their parameters).
        model: a packaged alias, a local folder, a ``.gguf`` file or a hub id (loaded once and kept for the next
            call with the same arguments), a :class:`Loaded` from :func:`headscope.load`, a ``(model, tokenizer)``
            pair, or a transformers model with ``processor=`` its tokenizer or processor. Default: the packaged
            ``smollm2-135m``.
        text: the text to analyse instead of the analysis's default probe (for a vision-language model, the
            prompt of the image ``input``).
        input: a file to analyse, as ``--input``: UTF-8 text, a ``.wav`` for speech models, an image.
        max_tokens: truncate inputs to this many tokens.
        seed: seed for probes and sampling.
        dtype, device: how a model given by name is loaded.
        progress: show the long steps with their counts and time left: None (the default) in Jupyter only (tqdm
            bars), True always (plain lines on stderr outside Jupyter), False never.
        **params: the analysis's parameters (``headscope analyses`` lists them), as Python values or as the text
            ``--set`` takes; one :class:`HeadscopeError` names a parameter that is unknown or of the wrong type.

    A failing analysis raises its error here (``headscope analyze`` records it and goes on with the others).
    """
    from headscope.runner import run_analysis

    loaded = as_loaded(model, processor, dtype=dtype, device=device)
    chosen = registry.get(analysis)
    if not chosen.fits(loaded.info.kind):
        raise HeadscopeError(f"analysis '{analysis}' does not fit a {loaded.info.kind} model (it fits "
                             f"{', '.join(chosen.kinds)})")
    chosen.read_params(params, seed)  # refuse bad parameters before loading the probe or running anything
    shown = progress_reporter(progress)
    with reporting(shown):
        return run_analysis(chosen, loaded, Scope(loaded.model), text=text,
                            input_path=None if input is None else str(input), max_tokens=max_tokens, seed=seed,
                            params=params, failures="raise")


def progress_reporter(progress: bool | None) -> Reporter:
    """How :func:`run` shows long steps (see its ``progress``)."""
    if progress is False or (progress is None and not (in_jupyter() and _widgets())):
        return Reporter()  # without ipywidgets, tqdm in Jupyter writes a warning and a text line per update
    return Notebook() if in_jupyter() else Plain()


def _widgets() -> bool:
    import importlib.util

    return importlib.util.find_spec("ipywidgets") is not None


def as_loaded(model: Model, processor: Any = None, *, dtype: str = "float32", device: str = "cpu") -> Loaded:
    """``model`` as a :class:`Loaded` (see :func:`run` for what it may be)."""
    if isinstance(model, Loaded):
        return model
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module):
        model, processor = model
    if isinstance(model, nn.Module):
        if processor is None:
            raise HeadscopeError(f"a {type(model).__name__} object needs its tokenizer or processor: pass "
                                 "processor=..., or (model, tokenizer), or load it with headscope.load")
        if not hasattr(model, "config"):
            raise HeadscopeError(f"a {type(model).__name__} is not a transformers model: headscope needs one with "
                                 "a config (a PreTrainedModel)")
        dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
        source = {"type": "object", "class": type(model).__name__,
                  "name_or_path": getattr(model.config, "_name_or_path", "") or None}
        return Loaded(model.eval(), processor,
                      describe(model, kind_of(model.config), source, dtype_name, str(model.device)))
    if model is not None and not isinstance(model, str | Path):
        raise HeadscopeError(f"cannot analyse a {type(model).__name__}: give a model name or path, a Loaded, or a "
                             "transformers model with its tokenizer")
    return _load_once(None if model is None else str(model), dtype, device)


@functools.lru_cache(maxsize=1)
def _load_once(source: str | None, dtype: str, device: str) -> Loaded:
    """The last model loaded by name, kept so that a notebook's next call does not load it again."""
    return load(source, dtype=dtype, device=device)


# --- patterns after the fact ----------------------------------------------------------------------------------


@dataclass
class Patterns:
    """Full query x key attention maps of chosen heads on one input, with readable token labels.

    ``maps[(stack, layer, head)]`` is a (queries, keys) float32 array; ``tokens[stack]`` the (query labels, key
    labels) of the stack: the decoded text of each token, ``Ġ`` and ``▁`` shown as spaces. Self-attention stacks
    have the input's tokens on both axes; an encoder-decoder's ``cross`` stack has the output's tokens as queries
    and the source's as keys.
    """

    maps: dict[tuple[str, int, int], np.ndarray]
    tokens: dict[str, tuple[list[str], list[str]]]
    stacks: list[str] = field(default_factory=list)

    def heads(self, stack: str | None = None) -> list[tuple[int, int]]:
        """The (layer, head) pairs held for ``stack`` (default: the first stack)."""
        stack = self._stack(stack)
        return [(layer, head) for s, layer, head in self.maps if s == stack]

    def map(self, layer: int, head: int, stack: str | None = None) -> np.ndarray:
        """Head ``layer.head``'s (queries, keys) map on ``stack`` (default: the first stack)."""
        stack = self._stack(stack)
        if (stack, layer, head) not in self.maps:
            raise KeyError(f"no pattern of head {layer}.{head} on stack {stack!r}; held: "
                           f"{', '.join(f'{la}.{h}' for la, h in self.heads(stack)) or 'none'}")
        return self.maps[(stack, layer, head)]

    def plot(self, layer: int, head: int, stack: str | None = None) -> go.Figure:
        """One head's token x token pattern: queries down, keys across, the tokens' text on hover and the axes."""
        stack = self._stack(stack)
        queries, keys = (_unique(labels) for labels in self.tokens[stack])
        figure = go.Figure(_heatmap(self.map(layer, head, stack), queries, keys))
        figure.update_layout(title=plotting.escape_label(f"{stack} head {layer}.{head}"), template="simple_white",
                             xaxis_title="key", yaxis_title="query", yaxis_autorange="reversed",
                             width=max(420, 160 + 14 * len(keys)), height=max(380, 140 + 14 * len(queries)))
        return figure

    def plot_heads(self, stack: str | None = None, heads: Iterable[tuple[int, int]] | None = None) -> go.Figure:
        """Several heads of one stack, one at a time: a menu picks the head (BertViz's head view, as a plotly
        figure)."""
        stack = self._stack(stack)
        chosen = list(heads) if heads is not None else self.heads(stack)
        if not chosen:
            raise KeyError(f"no patterns held for stack {stack!r}")
        queries, keys = (_unique(labels) for labels in self.tokens[stack])
        figure = go.Figure([_heatmap(self.map(layer, head, stack), queries, keys, visible=i == 0)
                            for i, (layer, head) in enumerate(chosen)])
        buttons = [{"label": f"{layer}.{head}", "method": "update",
                    "args": [{"visible": [j == i for j in range(len(chosen))]},
                             {"title": f"{stack} head {layer}.{head}"}]} for i, (layer, head) in enumerate(chosen)]
        figure.update_layout(title=f"{stack} head {chosen[0][0]}.{chosen[0][1]}", template="simple_white",
                             updatemenus=[{"buttons": buttons, "x": 1.0, "y": 1.12, "xanchor": "right"}],
                             xaxis_title="key", yaxis_title="query", yaxis_autorange="reversed",
                             width=max(460, 160 + 14 * len(keys)), height=max(420, 160 + 14 * len(queries)))
        return figure

    def plot_grid(self, stack: str | None = None) -> go.Figure:
        """Every held head of one stack at once, a layer per row and a head per column (BertViz's model view)."""
        stack = self._stack(stack)
        held = self.heads(stack)
        layers = sorted({layer for layer, _ in held})
        columns = sorted({head for _, head in held})
        # a gap of a few pixels whatever the grid's size (plotly refuses gaps past 1 / (n - 1)), room for the titles
        figure = make_subplots(rows=len(layers), cols=len(columns),
                               horizontal_spacing=min(0.02, 0.2 / max(1, len(columns) - 1)),
                               vertical_spacing=min(0.04, 0.3 / max(1, len(layers) - 1)),
                               subplot_titles=[f"{layer}.{head}" if (layer, head) in held else ""
                                               for layer in layers for head in columns])
        figure.update_annotations(font_size=9)
        queries, keys = (_unique(labels) for labels in self.tokens[stack])
        for layer, head in held:
            trace = _heatmap(self.map(layer, head, stack), queries, keys)
            trace.showscale = False
            figure.add_trace(trace, row=layers.index(layer) + 1, col=columns.index(head) + 1)
        figure.update_xaxes(showticklabels=False)
        figure.update_yaxes(showticklabels=False, autorange="reversed")
        figure.update_layout(title=f"{stack}: {len(held)} heads", template="simple_white",
                             width=max(400, 110 * len(columns)), height=max(400, 110 * len(layers)))
        return figure

    def _stack(self, stack: str | None) -> str:
        if stack is None:
            return self.stacks[0]
        if stack not in self.tokens:
            raise KeyError(f"no stack {stack!r} in these patterns; they hold {self.stacks}")
        return stack


def patterns_of(model: Model, text: str | None = None, heads: Any = None, *, stack: str | None = None,
                max_tokens: int | None = None, memory_gib: float = DEFAULT_PATTERN_GIB, processor: Any = None,
                dtype: str = "float32", device: str = "cpu") -> Patterns:
    """The full attention patterns of ``heads`` on ``text`` (default: the start of the shipped prose), in one
    forward pass, read from the same capture as every analysis.

    ``heads``: ``(layer, head)`` pairs of ``stack``, ``(stack, layer, head)`` triples, or None for every head of
    every token stack, refused with one :class:`HeadscopeError` when their maps would take more than
    ``memory_gib`` GiB (the unit of every analysis's memory budget). ``stack`` defaults to the model's first stack
    (``self``; an encoder-decoder's ``decoder``, with ``cross`` and ``encoder`` beside it). An encoder-decoder
    reads the text as its source and decodes its own output (at most 16 tokens) for the decoder and
    cross-attention patterns.
    """
    loaded = as_loaded(model, processor, dtype=dtype, device=device)
    net, processor, info = loaded
    tokenizer = getattr(processor, "tokenizer", processor)
    if info.kind not in ("decoder", "encoder", "encoder-decoder") or not callable(tokenizer) or hasattr(
            processor, "feature_extractor"):
        raise HeadscopeError(f"patterns_of reads text; a {info.kind} model's input is not text alone")
    inputs = probe_text.encode(tokenizer, probe_text.prose() if text is None else text, info.max_tokens,
                               max_tokens if max_tokens is not None else (48 if text is None else None))
    inputs = {name: tensor.to(net.device) for name, tensor in inputs.items()}
    source = probe_text.readable(tokenizer, inputs["input_ids"][0].tolist())
    if info.kind == "encoder-decoder":
        decoded = decoding.own_output(net, inputs, DECODED_TOKENS)
        inputs["decoder_input_ids"] = decoded.sequence
        target = probe_text.readable(tokenizer, decoded.sequence[0].tolist())
        tokens = {"decoder": (target, target), "cross": (target, source), "encoder": (source, source)}
    else:
        tokens = {s: (source, source) for s in info.stacks if not s.startswith("vision")}
    chosen = _heads(heads, stack or next(iter(tokens)), tokens, info)
    budget = int(memory_gib * 2**30)
    needed = sum(4 * len(tokens[s][0]) * len(tokens[s][1]) for s, _, _ in chosen)
    if needed > budget:
        raise HeadscopeError(f"the patterns of {len(chosen)} heads on {len(source)} tokens need "
                             f"{needed / 2**20:.0f} MiB, over memory_gib={memory_gib:g}: name fewer heads, use "
                             "a shorter text, or raise memory_gib")
    reducer = FullMaps(chosen, budget_bytes=budget)
    with torch.no_grad(), Scope(net).capture(reducer):
        net(**inputs)
    maps = {(s, layer, head): probs[0].float().numpy() for (_, s, layer, head), probs in reducer.result().items()}
    order = [s for s in tokens if any(key[0] == s for key in maps)]
    return Patterns(maps, {s: tokens[s] for s in order}, order)


def _heads(heads: Any, stack: str, tokens: dict, info) -> list[tuple[str, int, int]]:
    if stack not in tokens:
        raise HeadscopeError(f"no token stack {stack!r} in this model: choose from {', '.join(tokens)}")
    if heads is None:
        return [(s, layer, head) for s in tokens for layer in range(info.stacks[s].layers)
                for head in range(info.stacks[s].heads)]
    chosen = []
    for item in heads:
        triple = tuple(item) if len(item) == 3 else (stack, *item)
        s, layer, head = triple
        if s not in tokens:
            raise HeadscopeError(f"no token stack {s!r} in this model: choose from {', '.join(tokens)}")
        shape = info.stacks[s]
        if not (0 <= layer < shape.layers and 0 <= head < shape.heads):
            raise HeadscopeError(f"no head {layer}.{head} in stack {s!r}: it has {shape.layers} layers of "
                                 f"{shape.heads} heads")
        chosen.append((s, int(layer), int(head)))
    return chosen


def _unique(labels: list[str]) -> list[str]:
    """Axis labels that stay distinct (plotly merges equal categories): the position, then the escaped text."""
    return [f"{i} {plotting.escape_label(label.replace(chr(10), '⏎'))}" for i, label in enumerate(labels)]


def _heatmap(values: np.ndarray, queries: list[str], keys: list[str], visible: bool = True) -> go.Heatmap:
    return go.Heatmap(z=values, x=keys, y=queries, colorscale=plotting.SEQUENTIAL, zmin=0.0, visible=visible,
                      hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.4f}<extra></extra>")
