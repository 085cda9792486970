"""The mixture-of-experts and expert-parallel part of the one layout rule (``Layout.validate``
calls :func:`check_experts`; docs/expert.md). Pure Python, no torch import.

``ep`` sub-divides ``dp``: the ``dp`` data-parallel ranks form ``dp / ep`` groups of ``ep``
consecutive dp indices; each such ep group holds every expert once (``E / ep`` per rank) and
exchanges tokens by all-to-all; the ``dp / ep`` ranks with the same index in their ep group
hold the same experts and average those experts' gradients.
"""

from __future__ import annotations

from typing import Any

from paratrain.errors import ConfigError
from paratrain.models.configs import ModelConfig


def check_experts(layout: Any, model: ModelConfig) -> None:
    """ConfigError unless ``layout`` can train the mixture-of-experts ``model`` (or, for a dense
    model, unless ``ep`` is 1)."""
    ep, dp, experts = layout.ep, layout.dp, model.num_experts
    if ep > 1 and not experts:
        raise ConfigError(f"--ep {ep} shards the experts of a mixture-of-experts model, and model "
                          f"{model.name!r} has none; use a model with experts (e.g. --model tiny-moe) or --ep 1.")
    if ep > 1 and experts % ep:
        valid = ", ".join(str(e) for e in range(1, experts + 1) if experts % e == 0)
        raise ConfigError(f"ep={ep} must divide the model's {experts} experts (every ep rank holds E / ep of "
                          f"them); valid ep for {model.name!r}: {valid}.")
    if ep > 1 and dp % ep:
        valid = ", ".join(str(e) for e in range(1, dp + 1) if dp % e == 0 and experts % e == 0)
        raise ConfigError(f"expert parallelism sub-divides data parallelism (the ep ranks are dp ranks), so ep "
                          f"must divide dp; got ep={ep}, dp={dp}. Use --dp a multiple of {ep} (e.g. --dp {ep}), "
                          f"or an ep dividing dp={dp} (valid here: {valid}).")


def expert_refusal(layout: Any, model: ModelConfig, dp_impl: str = "bucketed") -> str | None:
    """Why the runtime does not train the mixture-of-experts ``model`` in ``layout`` (valid by
    :func:`check_experts`; the planner still prices it), or None when it does (and for a dense model)."""
    ep = layout.ep
    if not model.num_experts:
        return None
    refused = [(layout.cp > 1, f"context parallelism (cp={layout.cp})",
                "the routing groups are whole sequences (per-sequence capacity and balancing loss)"),
               (layout.sequence_parallel, "sequence parallelism",
                "the routing groups are whole sequences, which it splits over tp"),
               (layout.recompute == "full", "full recomputation",
                "replaying a block would route (and count) its tokens twice; --recompute selective works"),
               (layout.zero == 3 and layout.pp > 1, "ZeRO-3 with pipeline parallelism",
                "a stage's units are its modules, and the experts' own units over the ep ranks are not "
                "wired into them; --zero 1 or 2 with --pp, or --zero 3 with --pp 1, work"),
               (ep > 1 and dp_impl != "bucketed", f"--dp-impl {dp_impl} with ep={ep}",
                "the experts' gradients are reduced apart from the rest, by the bucketed data parallelism")]
    for bad, what, why in refused:
        if bad:
            return (f"the mixture-of-experts model {model.name!r} does not implement {what} yet: {why}. "
                    f"Expert parallelism composes with dp, tp, pp, ZeRO and dropout (--dp, --ep, --tp, --pp, "
                    f"--zero, --dropout); drop that option.")
    return None
