"""Checkpoints and model directories survive kills and damage: a truncated newest checkpoint is
named and the one before it used; a model directory is whole or absent, and checked when loaded."""

import json
import os

import pytest
import torch

from models import PonderConfig, PonderForCausalLM
from training.checkpoint import check_model_dir, load_latest_checkpoint, save_checkpoint, save_model


def truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def tiny_model():
    return PonderForCausalLM(PonderConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32))


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    for step in (3, 6):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((1000,), float(step))})
    latest = tmp_path / "checkpoints" / "step_00000006" / "state.pt"
    truncate(latest)
    with pytest.warns(UserWarning, match=str(latest)):
        path, state = load_latest_checkpoint(tmp_path)
    assert path.name == "step_00000003" and state["step"] == 3 and torch.equal(state["w"], torch.full((1000,), 3.0))


@pytest.mark.parametrize("damage", ["truncated shard", "missing shard", "missing metadata"])
def test_a_damaged_sharded_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    """A DCP checkpoint whose state.pt is whole but whose shards are not: every shard the metadata
    lists is checked against the bytes it needs, and the warning names the file."""
    from training.distributed import ShardedSaver

    saver = ShardedSaver(asynchronous=False)
    for step in (3, 6):
        saver.save(tmp_path, step, {"step": step}, {"w": torch.full((4096,), float(step))})
    dcp_dir = tmp_path / "checkpoints" / "step_00000006" / "dcp"
    shard = next(dcp_dir.glob("*.distcp"))
    if damage == "truncated shard":
        truncate(shard)
    elif damage == "missing shard":
        shard.unlink()
    else:
        (dcp_dir / ".metadata").unlink()
    (tmp_path / "checkpoints" / ".tmp_step_00000009").mkdir()  # what a save killed midway leaves
    named = shard if damage != "missing metadata" else dcp_dir / ".metadata"
    with pytest.warns(UserWarning, match=str(named)):
        path, state = load_latest_checkpoint(tmp_path)
    assert path.name == "step_00000003" and state["step"] == 3
    assert not (tmp_path / "checkpoints" / ".tmp_step_00000009").exists()


def test_an_asynchronous_save_holds_the_state_it_was_given_and_counts_once_written(tmp_path):
    """learner.async_save: save() returns at once, training goes on changing the tensors in place,
    and the checkpoint, once written, holds them as they were; until then the previous one is the
    newest."""
    import torch.distributed.checkpoint as dcp

    from training.distributed import ShardedSaver

    saver = ShardedSaver(asynchronous=True)
    w = torch.randn(1 << 20)
    saved = w.clone()
    saver.save(tmp_path, 3, {"step": 3}, {"w": w})
    saver.wait()
    saver.save(tmp_path, 6, {"step": 6}, {"w": w})
    w.add_(1.0)  # the next optimiser step, while the thread writes
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_00000003"]
    saver.wait()
    path, state = load_latest_checkpoint(tmp_path)
    assert path.name == "step_00000006" and state["step"] == 6
    read = {"w": torch.zeros_like(w)}
    dcp.load(read, checkpoint_id=str(path / "dcp"), no_dist=True)
    assert torch.equal(read["w"], saved)


def test_only_the_newest_checkpoints_are_kept_and_no_temporaries(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]


def test_model_dir_is_checked_to_the_end_of_its_weights(tmp_path):
    model = save_model(tiny_model(), tmp_path / "model")
    check_model_dir(model)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the temporary dir was renamed away
    truncate(model / "model.safetensors", keep=0.9)
    assert json.loads((model / "config.json").read_text())  # config.json alone is no proof
    with pytest.raises(ValueError, match=r"model\.safetensors is unreadable"):
        check_model_dir(model)


def test_a_kill_between_the_renames_of_a_model_save_leaves_the_old_model(tmp_path):
    save_model(tiny_model(), tmp_path / "model")
    os.replace(tmp_path / "model", tmp_path / ".model.old")  # where a kill after the first rename leaves it
    check_model_dir(tmp_path / "model")  # restores it
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_resaving_a_model_replaces_it_whole(tmp_path):
    first, second = tiny_model(), tiny_model()
    save_model(first, tmp_path / "model")
    save_model(second, tmp_path / "model")
    reloaded = PonderForCausalLM.from_pretrained(tmp_path / "model")
    assert torch.equal(reloaded.embed.weight, second.embed.weight)


def test_a_resumed_logger_drops_records_past_the_checkpoint_and_continues_the_wandb_run(tmp_path, monkeypatch):
    from training.metrics import MetricsLogger, read_metrics

    monkeypatch.setenv("WANDB_MODE", "offline")  # the test session disables wandb; this test needs its files

    logger = MetricsLogger(tmp_path, wandb_mode="offline", run_name="r")
    for step in range(5):
        logger.log({"x": float(step)}, step=step)
    first_id = logger._wandb.id
    logger.close()
    logger = MetricsLogger(tmp_path, wandb_mode="offline", run_name="r", resume_step=2)  # checkpoint at step 2
    assert logger._wandb.id == first_id
    logger.log({"x": 30.0}, step=3)
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{first_id}" in p.name for p in runs)  # one wandb run, written twice
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]


@pytest.mark.parametrize("failure", ["errno", "full disk, no errno"])
def test_a_failed_save_names_the_path_and_the_errno_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    """What a full disk does: the save stops, one line says where and why, the checkpoint before it
    loads. torch's zip writer reports a full disk without an errno; the free space says it then."""
    import errno
    import shutil as shutil_module

    from training.checkpoint import StorageError, writing

    save_checkpoint(tmp_path, 3, {"step": 3})

    def full(*args, **kwargs):
        if failure == "errno":
            raise RuntimeError("saving failed") from OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full)
    if failure != "errno":
        usage = shutil_module.disk_usage(tmp_path)
        monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage._replace(free=1024))
    with pytest.raises(StorageError) as caught:
        with writing(tmp_path / "checkpoints"):
            save_checkpoint(tmp_path, 6, {"step": 6})
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "checkpoints") in message and "[Errno 28]" in message
    monkeypatch.undo()
    path, state = load_latest_checkpoint(tmp_path)
    assert state["step"] == 3


def test_a_storage_error_inside_an_actor_reaches_the_user_as_one_line(ray_cluster, capsys):
    ray = ray_cluster
    from training.graph import cli
    from training.checkpoint import StorageError

    @ray.remote
    def save():
        raise StorageError("writing /runs/x/checkpoints failed: [Errno 28] No space left on device; ...")

    with pytest.raises(SystemExit) as stopped:
        cli(lambda argv: ray.get(save.remote()))
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: writing /runs/x/checkpoints failed: [Errno 28] No space left on device; ..."
