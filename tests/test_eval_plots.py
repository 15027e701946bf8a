"""tools/plot_training.py: scalars read back from TensorBoard event files, loss and routing plots written."""

from __future__ import annotations
from pathlib import Path

import pytest
from tools_import import load_tool


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """Event files with the tags the training module and RoutingStatsCallback log, split over a resume."""
    from torch.utils.tensorboard import SummaryWriter

    folder = tmp_path / "quickstart" / "version_0"
    first = SummaryWriter(str(folder))
    for step in range(0, 30, 10):
        first.add_scalar("train/lm_loss", 5.0 - step / 10, step)
    first.add_scalar("val/loss", 4.5, 20)
    first.close()
    second = SummaryWriter(str(folder), filename_suffix=".resumed")  # a resumed run: a second event file
    for step in range(20, 50, 10):
        second.add_scalar("train/lm_loss", 4.0 - step / 100, step)
        for layer in range(2):
            for memory in range(3):
                second.add_scalar(f"routing/layer{layer}/load_mem{memory}", (memory + 1) / 6, step)
            second.add_scalar(f"routing/layer{layer}/router_entropy", 0.5 + layer, step)
            second.add_scalar(f"routing/layer{layer}/load_entropy", 1.0, step)
    second.add_scalar("val/loss", 3.5, 40)
    second.close()
    return folder


def test_reads_every_point_and_merges_event_files(run_dir):
    tool = load_tool("plot_training")
    scalars = tool.read_scalars(run_dir)
    # Step 20 was logged by both files: the later one wins.
    assert scalars["train/lm_loss"] == [(0, 5.0), (10, 4.0), (20, pytest.approx(3.8)), (30, pytest.approx(3.7)),
                                        (40, pytest.approx(3.6))]
    assert scalars["val/loss"] == [(20, 4.5), (40, 3.5)]
    layers, memories = tool.routing_series(scalars)
    assert memories == 3 and sorted(layers) == [0, 1]
    assert layers[1][2] == [(20, 0.5), (30, 0.5), (40, 0.5)]


def test_writes_both_plots(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    written = load_tool("plot_training").main([str(run_dir), "--out", str(tmp_path / "plots" / "run"), "--note", "test run"])
    assert set(written) == {"loss", "routing"}
    for path in written.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_routing_scalars_only_the_loss_plot_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run"))
    writer.add_scalar("train/loss", 1.0, 0)
    writer.close()
    written = load_tool("plot_training").main([str(tmp_path / "run"), "--out", str(tmp_path / "x")])
    assert set(written) == {"loss"}
    assert "RoutingStatsCallback was not used" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        load_tool("plot_training").read_scalars(tmp_path / "empty")
