"""Router health of a MoM model during training: load per memory, entropies, starved memories, heatmap."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

def routing_summary(load: torch.Tensor, starved_threshold: float) -> dict[str, torch.Tensor]:
    """Per-layer statistics of a (num_layers, E) load matrix whose rows are fractions of routed slots.

    ``load_entropy``: entropy (nats) of each row, log(E) when balanced. ``max_min_ratio``: largest over
    smallest share (the smallest floored at 1e-6, so a memory that got nothing reads 1e6 x the largest).
    ``starved``: (L, E) bool, share below ``starved_threshold`` times the uniform share 1/E.
    """
    num_memories = load.shape[-1]
    p = load.float()
    load_entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    max_min_ratio = p.amax(-1) / p.amin(-1).clamp_min(1e-6)
    starved = p < starved_threshold / num_memories
    return {"load_entropy": load_entropy, "max_min_ratio": max_min_ratio, "starved": starved}


def load_heatmap(load: torch.Tensor):
    """A labelled matplotlib figure of a (L, E) load matrix: one row per layer, one column per memory, the colour
    the share relative to the uniform one (blue at 0, neutral at 1/E, red at 2/E and above).

    Built on ``matplotlib.figure.Figure`` rather than pyplot so that the process's plotting backend is left alone.
    """
    from matplotlib.figure import Figure

    relative = load.float().cpu().numpy() * load.shape[-1]
    fig = Figure(figsize=(2.5 + 0.6 * load.shape[1], 1.2 + 0.3 * load.shape[0]))
    ax = fig.subplots()
    image = ax.imshow(relative, cmap="coolwarm", vmin=0.0, vmax=2.0, aspect="auto")
    ax.set_xlabel("memory")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="load / uniform share")
    fig.tight_layout()
    return fig


class RoutingStatsCallback(L.Callback):
    """Logs how a MoM model's routers spread tokens over their memories.

    Every ``log_every_n_steps`` optimizer steps, averaged over all training batches since the last log, per
    layer ``l``: ``routing/layer{l}/load_mem{e}`` (share of routed slots of memory e; 1/E when balanced),
    ``routing/layer{l}/router_entropy`` (mean per-token entropy of the router distribution: low = confident),
    ``routing/layer{l}/load_entropy`` (entropy of the load shares: log E = balanced, 0 = one memory takes all),
    ``routing/layer{l}/max_min_ratio`` (the busiest memory's share over the idlest one's: the layer's load
    imbalance) and ``routing/layer{l}/starved`` (memories below the threshold); over all layers the total
    ``routing/starved``, the most imbalanced layer's ratio ``routing/max_min_ratio_worst`` and its index
    ``routing/worst_layer``. With TensorBoard also histograms of the shares and router entropies and a
    layer x memory heatmap ``routing/load_heatmap``. A warning is emitted when a memory stays starved for
    ``starved_patience`` consecutive logs. Reads the router statistics the training step returns (no extra
    forward); between logs it only adds tensors on the device. A model without a router logs nothing.

    Args:
        log_every_n_steps: optimizer steps between logs.
        starved_threshold: a memory is starved when its share is below ``starved_threshold / E`` (a fraction of
            the uniform share).
        starved_patience: consecutive starved logs before warning.
    """

    def __init__(self, log_every_n_steps: int = 50, starved_threshold: float = 0.1, starved_patience: int = 3):
        if not isinstance(log_every_n_steps, int) or isinstance(log_every_n_steps, bool) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be a positive integer, got {log_every_n_steps!r}")
        if not 0.0 < starved_threshold < 1.0:
            raise ValueError(f"starved_threshold must lie in (0, 1) (a fraction of the uniform share), "
                             f"got {starved_threshold!r}")
        if not isinstance(starved_patience, int) or isinstance(starved_patience, bool) or starved_patience < 1:
            raise ValueError(f"starved_patience must be a positive integer, got {starved_patience!r}")
        self.log_every_n_steps = log_every_n_steps
        self.starved_threshold = starved_threshold
        self.starved_patience = starved_patience
        self._load_sum: torch.Tensor | None = None
        self._entropy_sum: torch.Tensor | None = None
        self._batches = 0
        self._last_logged_step = -1
        self._starved_streak: torch.Tensor | None = None  # (L, E) consecutive starved logs, on the host

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.loggers:
            raise MisconfigurationException(
                "RoutingStatsCallback needs a logger: attach one to the Trainer (e.g. "
                "trainer.logger=TensorBoardLogger) or remove the callback")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not isinstance(outputs, Mapping) or outputs.get("router_load") is None:
            return
        load, entropy = outputs["router_load"], outputs["router_entropy"]
        if self._load_sum is None:
            self._load_sum, self._entropy_sum = torch.zeros_like(load), torch.zeros_like(entropy)
        self._load_sum += load
        self._entropy_sum += entropy
        self._batches += 1
        step = trainer.global_step
        # With gradient accumulation several batches end at the same global step: log once, after the update.
        if step == 0 or step % self.log_every_n_steps or step == self._last_logged_step:
            return
        self._last_logged_step = step
        load = trainer.strategy.reduce(self._load_sum / self._batches, reduce_op="mean")
        entropy = trainer.strategy.reduce(self._entropy_sum / self._batches, reduce_op="mean")
        self._load_sum.zero_()
        self._entropy_sum.zero_()
        self._batches = 0
        self._log(trainer, load.float().cpu(), entropy.float().cpu(), step - 1)

    def _log(self, trainer: L.Trainer, load: torch.Tensor, entropy: torch.Tensor, step: int) -> None:
        summary = routing_summary(load, self.starved_threshold)
        starved = summary["starved"]
        self._starved_streak = (torch.zeros_like(starved, dtype=torch.int64) if self._starved_streak is None
                                else self._starved_streak)
        self._starved_streak = torch.where(starved, self._starved_streak + 1, 0)
        for layer, memory in (self._starved_streak == self.starved_patience).nonzero().tolist():
            rank_zero_warn(
                f"RoutingStatsCallback: memory {memory} of layer {layer} received {load[layer, memory]:.2%} of the "
                f"routed slots (below {self.starved_threshold:g} x the uniform share {1 / load.shape[1]:.2%}) for "
                f"{self.starved_patience} consecutive logs")

        ratio = summary["max_min_ratio"]
        worst = int(ratio.argmax())
        metrics: dict[str, float] = {"routing/starved": float(starved.sum()),
                                     "routing/max_min_ratio_worst": float(ratio[worst]),
                                     "routing/worst_layer": float(worst)}
        for layer in range(load.shape[0]):
            prefix = f"routing/layer{layer}"
            metrics.update({f"{prefix}/load_mem{e}": float(share) for e, share in enumerate(load[layer])})
            metrics[f"{prefix}/router_entropy"] = float(entropy[layer])
            metrics[f"{prefix}/load_entropy"] = float(summary["load_entropy"][layer])
            metrics[f"{prefix}/max_min_ratio"] = float(summary["max_min_ratio"][layer])
            metrics[f"{prefix}/starved"] = float(starved[layer].sum())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                experiment = logger.experiment
                experiment.add_histogram("routing/load_share", load.reshape(-1), global_step=step)
                experiment.add_histogram("routing/router_entropy", entropy, global_step=step)
                experiment.add_figure("routing/load_heatmap", load_heatmap(load), global_step=step, close=True)

    def state_dict(self) -> dict[str, Any]:
        return {"last_logged_step": self._last_logged_step, "starved_streak": self._starved_streak}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_logged_step = state_dict["last_logged_step"]
        self._starved_streak = state_dict["starved_streak"]
