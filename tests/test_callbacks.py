"""RoutingStatsCallback: argument checks, statistics, logging cadence, starvation warnings, heatmap."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from mom_lit import MoMConfig
from mom_lit.callbacks import RoutingStatsCallback, load_heatmap, routing_summary
from mom_lit.training import MoMLightningModule

TOL = 1e-6  # fp32 means of a handful of shares


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call in memory."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))


def routing_records(logger: RecordingLogger) -> list[tuple[int, dict[str, float]]]:
    return [(s, m) for s, m in logger.records if any(k.startswith("routing/") for k in m)]


def token_rows(vocab_size: int, seq_len: int, rows: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (rows, seq_len + 1), generator=g)
    return [{"input_ids": r[:-1], "labels": r[1:]} for r in tokens]


def tiny_module(**overrides) -> MoMLightningModule:
    values = dict(vocab_size=53, hidden_size=32, num_layers=3, num_heads=2, head_dim=8, num_memories=4, topk=2,
                  chunk_size=8, backend="eager")
    return MoMLightningModule(MoMConfig(**{**values, **overrides}), warmup_steps=1)


def run_fit(module, callback, logger, max_steps=6, accumulate=1):
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger, callbacks=[callback],
                        accumulate_grad_batches=accumulate, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, log_every_n_steps=1000)
    trainer.fit(module, DataLoader(token_rows(53, 11, 40), batch_size=2))
    return trainer


# Arguments --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(log_every_n_steps=0), "log_every_n_steps"), (dict(log_every_n_steps=2.5), "log_every_n_steps"),
    (dict(log_every_n_steps=True), "log_every_n_steps"), (dict(starved_threshold=0.0), "starved_threshold"),
    (dict(starved_threshold=1.0), "starved_threshold"), (dict(starved_patience=0), "starved_patience"),
])
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoutingStatsCallback(**kwargs)


def test_fails_early_without_logger():
    with pytest.raises(MisconfigurationException, match="needs a logger"):
        run_fit(tiny_module(), RoutingStatsCallback(), logger=False, max_steps=1)


# Statistics -------------------------------------------------------------------------------------------------
def test_routing_summary_balanced_and_skewed():
    load = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.2, 0.1, 0.0], [0.5, 0.49, 0.005, 0.005]])
    s = routing_summary(load, starved_threshold=0.1)  # starved below 0.1 * 0.25 = 0.025
    torch.testing.assert_close(s["load_entropy"][0], torch.tensor(math.log(4)), rtol=0, atol=TOL)
    expected_skewed = -sum(p * math.log(p) for p in (0.7, 0.2, 0.1))
    torch.testing.assert_close(s["load_entropy"][1], torch.tensor(expected_skewed), rtol=0, atol=TOL)
    torch.testing.assert_close(s["max_min_ratio"], torch.tensor([1.0, 0.7 / 1e-6, 100.0]), rtol=1e-5, atol=0)
    assert s["starved"].tolist() == [[False] * 4, [False, False, False, True], [False, False, True, True]]


def test_heatmap_is_labelled_layers_by_memories():
    load = torch.tensor([[0.25, 0.25, 0.0, 0.5], [0.4, 0.2, 0.2, 0.2]])  # (L=2, E=4)
    fig = load_heatmap(load)
    heat, bar = fig.axes
    assert (heat.get_xlabel(), heat.get_ylabel()) == ("memory", "layer")
    assert bar.get_ylabel() == "load / uniform share"
    shown = heat.images[0].get_array()
    assert shown.shape == (2, 4)
    torch.testing.assert_close(torch.as_tensor(shown.data), load * 4)  # relative to the uniform share 1/E


# Cadence and values -----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_logs_every_n_optimizer_steps_the_mean_of_the_window(accumulate):
    loads: list[torch.Tensor] = []

    class Tap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loads.append(outputs["router_load"].clone())

    logger = RecordingLogger()
    module = tiny_module()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=logger,
                        callbacks=[Tap(), RoutingStatsCallback(log_every_n_steps=4)],
                        accumulate_grad_batches=accumulate, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, log_every_n_steps=1000)
    trainer.fit(module, DataLoader(token_rows(53, 11, 40), batch_size=2))

    records = routing_records(logger)
    assert [step for step, _ in records] == [3]  # after optimizer step 4 (plotted at the step's index)
    metrics = records[0][1]
    window = torch.stack(loads[: 4 * accumulate]).mean(0)  # (L, E) all batches of the first 4 steps
    for layer in range(3):
        for e in range(4):
            assert metrics[f"routing/layer{layer}/load_mem{e}"] == pytest.approx(float(window[layer, e]), abs=TOL)
        assert sum(metrics[f"routing/layer{layer}/load_mem{e}"] for e in range(4)) == pytest.approx(1.0, abs=TOL)
        assert 0.0 < metrics[f"routing/layer{layer}/router_entropy"] <= math.log(4) + TOL
        assert metrics[f"routing/layer{layer}/load_entropy"] <= math.log(4) + TOL
        assert metrics[f"routing/layer{layer}/max_min_ratio"] >= 1.0
    assert "routing/starved" in metrics


@pytest.mark.slow
def test_single_memory_model_logs_nothing():
    logger = RecordingLogger()
    run_fit(tiny_module(num_memories=1, topk=1, shared_memory=False), RoutingStatsCallback(log_every_n_steps=1),
            logger, max_steps=2)
    assert routing_records(logger) == []


# Starvation warnings ----------------------------------------------------------------------------------------
def _fake_trainer(logger: RecordingLogger) -> SimpleNamespace:
    return SimpleNamespace(global_step=0, loggers=[logger], is_global_zero=True,
                           strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))


def test_warns_once_after_patience_and_rearms_after_recovery():
    logger = RecordingLogger()
    trainer = _fake_trainer(logger)
    cb = RoutingStatsCallback(log_every_n_steps=1, starved_threshold=0.2, starved_patience=2)
    starved = {"router_load": torch.tensor([[0.5, 0.48, 0.01, 0.01]]), "router_entropy": torch.tensor([1.0])}
    healthy = {"router_load": torch.full((1, 4), 0.25), "router_entropy": torch.tensor([1.3])}
    sequence = [starved, starved, starved, healthy, starved, starved]
    warned_at = []
    for step, outputs in enumerate(sequence, start=1):
        trainer.global_step = step
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cb.on_train_batch_end(trainer, None, outputs, None, step)
        messages = [str(w.message) for w in caught if "RoutingStatsCallback" in str(w.message)]
        if messages:
            warned_at.append(step)
            assert {m.split(" of layer")[0] for m in messages} == {"RoutingStatsCallback: memory 2",
                                                                   "RoutingStatsCallback: memory 3"}
    assert warned_at == [2, 6]
    assert [m["routing/starved"] for _, m in routing_records(logger)] == [2, 2, 2, 0, 2, 2]
    assert cb.state_dict()["starved_streak"].tolist() == [[0, 0, 2, 2]]


def test_skips_steps_between_logs_and_repeated_global_steps():
    logger = RecordingLogger()
    trainer = _fake_trainer(logger)
    cb = RoutingStatsCallback(log_every_n_steps=3)
    outputs = {"router_load": torch.full((2, 2), 0.5), "router_entropy": torch.tensor([0.6, 0.6])}
    for step in [0, 1, 2, 3, 3, 4, 5, 6]:
        trainer.global_step = step
        cb.on_train_batch_end(trainer, None, outputs, None, 0)
    assert [s for s, _ in routing_records(logger)] == [2, 5]


def test_logs_each_layers_imbalance_and_the_worst_layer():
    logger = RecordingLogger()
    trainer = _fake_trainer(logger)
    cb = RoutingStatsCallback(log_every_n_steps=2)
    # Layer 1 is the most imbalanced (0.6 / 0.1 = 6); layer 0 is balanced and layer 2 is 0.4 / 0.2 = 2.
    load = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.6, 0.1, 0.15, 0.15], [0.4, 0.2, 0.2, 0.2]])
    outputs = {"router_load": load, "router_entropy": torch.ones(3)}
    for step in (1, 2, 3):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, None, outputs, None, 0)
    (step, metrics), = routing_records(logger)  # only at the logging interval
    assert step == 1
    assert [metrics[f"routing/layer{layer}/max_min_ratio"] for layer in range(3)] == pytest.approx([1.0, 6.0, 2.0])
    assert metrics["routing/max_min_ratio_worst"] == pytest.approx(6.0)
    assert metrics["routing/worst_layer"] == 1
