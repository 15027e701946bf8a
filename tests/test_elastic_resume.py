"""Resume on another number of ranks (litdata's elastic resume): the rows of every optimizer step after the
resume are those the uninterrupted run would have trained on, for the rest of the interrupted epoch; later
epochs are those of a run on the new number of ranks."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mom_lit.data import TextDataModule
from conftest import SEQ_LEN
from test_resume import block_rows

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 4  # rows per optimizer step; four_batch_epochs' 17 blocks make 4 steps per epoch at any world size


def rank_batches(data_dir: Path, world_size: int, steps: int, monkeypatch, state: dict | None = None,
                 epochs_after: int = 0, num_workers: int = 0) -> tuple[list[list[set]], dict]:
    """The rows of ``steps`` micro-batches of each of ``world_size`` ranks of ``GLOBAL_BATCH / world_size`` rows
    (litdata reads the rank layout from ``WORLD_SIZE``/``GLOBAL_RANK``, as under a launcher), resumed from
    ``state`` if given; then ``epochs_after`` whole further epochs. Returns, per epoch, the set of rows of each
    global step (the union over ranks), and rank 0's state after the first ``steps`` (what a checkpoint holds:
    Lightning saves rank 0's)."""
    per_rank, saved = [], {}
    for rank in range(world_size):
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        data = TextDataModule(data_dir=str(data_dir), seq_len=SEQ_LEN, batch_size=GLOBAL_BATCH // world_size,
                              num_workers=num_workers)
        data.setup("fit")
        if state is not None:
            data.load_state_dict(copy.deepcopy(state))  # each rank reads its own copy of the checkpoint
        loader = data.train_dataloader()
        batches = iter(loader)
        epochs = [[{tuple(r) for r in block_rows(next(batches)).tolist()} for _ in range(steps)]]
        if rank == 0:
            saved = data.state_dict()
        for _ in batches:  # the rest of this epoch, so that the next pass over the loader is the next epoch
            pass
        epochs += [[{tuple(r) for r in block_rows(b).tolist()} for b in loader] for _ in range(epochs_after)]
        per_rank.append(epochs)
    steps_per_epoch = [[set().union(*(r[e][s] for r in per_rank)) for s in range(len(per_rank[0][e]))]
                       for e in range(len(per_rank[0]))]
    return steps_per_epoch, saved


@pytest.mark.parametrize("saved_on,resumed_on,workers_saved,workers_resumed", [
    pytest.param(2, 1, 0, 0, id="2-to-1"), pytest.param(1, 2, 0, 0, id="1-to-2"), pytest.param(4, 2, 0, 0, id="4-to-2"),
    pytest.param(2, 1, 2, 2, id="2-to-1-2-workers"), pytest.param(2, 1, 2, 0, id="2-to-1-2-workers-to-0"),
])
def test_rest_of_the_epoch_is_what_the_uninterrupted_run_sees(four_batch_epochs, monkeypatch, saved_on, resumed_on,
                                                              workers_saved, workers_resumed):
    uninterrupted, _ = rank_batches(four_batch_epochs, saved_on, 4, monkeypatch, epochs_after=1,
                                    num_workers=workers_saved)
    assert all(len(step) == GLOBAL_BATCH for step in uninterrupted[0])
    assert len(set().union(*uninterrupted[0])) == 4 * GLOBAL_BATCH  # each row once per epoch
    _, state = rank_batches(four_batch_epochs, saved_on, 2, monkeypatch, num_workers=workers_saved)
    resumed, _ = rank_batches(four_batch_epochs, resumed_on, 2, monkeypatch, state=state, epochs_after=1,
                              num_workers=workers_resumed)
    assert resumed[0] == uninterrupted[0][2:]
    # Later epochs: every row once, dealt as a run on resumed_on ranks from the start would deal it. litdata
    # deals a fresh epoch by the ranks of the run, so its global batches differ from saved_on ranks'.
    fresh, _ = rank_batches(four_batch_epochs, resumed_on, 4, monkeypatch, epochs_after=1,
                            num_workers=workers_resumed)
    assert resumed[1] == fresh[1] and len(set().union(*resumed[1])) == 4 * GLOBAL_BATCH


def fit(tmp_path: Path, data_dir: Path, devices: int, max_steps: int, *extra: str) -> None:
    """A tiny model on ``data_dir`` through the command line, on ``devices`` gloo processes, with
    ``GLOBAL_BATCH`` rows per optimizer step (accumulating on one process); saves ``last.ckpt`` every step."""
    batch = 2  # rows per rank and micro-batch
    args = [
        sys.executable, "-m", "mom_lit", "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--config", str(REPO / "configs" / "ddp.yaml"), "--trainer.accelerator=cpu", "--trainer.num_nodes=1",
        f"--trainer.devices={devices}", f"--trainer.accumulate_grad_batches={GLOBAL_BATCH // (batch * devices)}",
        f"--trainer.max_steps={max_steps}", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.logger.init_args.version=0",
        "--trainer.callbacks=[]", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.save_last=true", "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks+=test_ddp.RecordRank", f"--trainer.callbacks.out_dir={tmp_path}",
        "--model.config.hidden_size=32", "--model.config.num_layers=2", "--model.config.head_dim=8",
        "--model.config.chunk_size=16", "--model.config.backend=eager", "--model.warmup_steps=1",
        f"--data.init_args.data_dir={data_dir}", f"--data.init_args.seq_len={SEQ_LEN}",
        f"--data.init_args.batch_size={batch}", "--data.init_args.num_workers=0", *extra,
    ]
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_saved_on_two_gloo_processes_resumed_on_one(tmp_path, four_batch_epochs, monkeypatch):
    """Through the command line: 2 DDP ranks train 2 steps and save; 1 process resumes from ``last.ckpt`` with
    the same global batch (2 micro-batches) and trains steps 3 and 4 on the rows the 2 ranks would have read."""
    saved, resumed = tmp_path / "saved", tmp_path / "resumed"
    saved.mkdir()
    resumed.mkdir()
    fit(saved, four_batch_epochs, 2, 2)
    checkpoint = saved / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 2
    fit(resumed, four_batch_epochs, 1, 4, f"--ckpt_path={checkpoint}")

    record = torch.load(resumed / "rank0.pt", weights_only=False)
    assert record["world_size"] == 1
    micro = [{tuple(row) for row in batch.tolist()} for batch in record["batches"]]  # input_ids rows
    steps = [micro[i] | micro[i + 1] for i in range(0, len(micro), 2)]  # 2 micro-batches per optimizer step
    uninterrupted, _ = rank_batches(four_batch_epochs, 2, 4, monkeypatch)
    assert steps == [{block[:-1] for block in step} for step in uninterrupted[0][2:]]

