"""Bad inputs fail at start, before Ray or any training, in one line (exit status 2) that names
the thing and what would be right; outputs of a submitted job land on a durable path."""

import json
import os

import pytest
import torch

import pipelines.rlp_midtrain as rlp_midtrain
import pipelines.ttt_pretrain as pretrain
from models import PonderConfig, PonderForCausalLM
from training.cluster import driver_threads, outputs_root, worker_pythonpath
from training.tokenizer import train_tokenizer

TINY = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.intermediate_size=64",
        "data.seq_len=32", "data.vocab_size=300", "train.batch_size=2", "train.eval_windows=2", "optim.warmup_steps=0",
        "wandb.mode=disabled"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"Question: what is {i} + {2 * i}? Answer: {3 * i}"}) + "\n"
                            for i in range(120)))
    return path


def fails_at_start(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("config error: "), err
    return err.splitlines()[-1]  # progress bars may come before it


def test_malformed_json_line_is_named_by_file_and_line(tmp_path, corpus, capsys):
    lines = corpus.read_text().splitlines()
    lines[41] = '{"text": "an unterminated string}'
    corpus.write_text("\n".join(lines) + "\n")
    err = fails_at_start(capsys, pretrain.main, [f"out_dir={tmp_path}", f"data.source={corpus}", *TINY])
    assert f"{corpus} line 42 is not valid JSON" in err


def test_missing_data_files_are_named(tmp_path, capsys):
    err = fails_at_start(capsys, pretrain.main, [f"out_dir={tmp_path}", f"data.source={tmp_path}/nope/*.jsonl", *TINY])
    assert f"data.source={tmp_path}/nope/*.jsonl" in err


def test_small_heldout_split_is_named_with_the_fraction_and_leaves_no_tokenizer(tmp_path, corpus, capsys):
    err = fails_at_start(capsys, pretrain.main, [f"out_dir={tmp_path}", "run_name=r", f"data.source={corpus}",
                                                 "data.heldout_fraction=0.01", *TINY])
    assert "held-out split" in err and "data.heldout_fraction (now 0.01)" in err
    assert not (tmp_path / "r" / "tokenizer").exists()


def test_resume_true_without_a_run_fails_and_auto_starts_then_continues(tmp_path, corpus, capsys):
    args = [f"out_dir={tmp_path}", "run_name=r", f"data.source={corpus}", "data.heldout_fraction=0.2", *TINY]
    err = fails_at_start(capsys, pretrain.main, [*args, "resume=true", "train.steps=2"])
    assert f"resume=true but there is no run at {tmp_path / 'r'}" in err and "resume=auto" in err
    pretrain.main([*args, "resume=auto", "train.steps=2", "train.save_every=2"])
    assert "resumed" not in capsys.readouterr().out
    pretrain.main([*args, "resume=auto", "train.steps=3", "train.save_every=3"])
    assert f"resumed {tmp_path / 'r'} at step 2" in capsys.readouterr().out
    assert not list(tmp_path.glob("r.*"))  # nothing moved aside: the same run went on


def test_a_live_run_holds_its_directory_and_a_dead_ones_lock_is_taken_over(tmp_path, corpus, capsys):
    """A second run on a live run's directory, fresh or resumed, stops before touching it, naming the
    holder; once the holder is dead its lock is taken over."""
    import socket
    import subprocess
    import sys

    args = [f"out_dir={tmp_path}", "run_name=r", f"data.source={corpus}", "data.heldout_fraction=0.2", *TINY,
            "train.steps=2", "train.save_every=2"]
    pretrain.main(args)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "r" / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                          "started": "earlier"}))
        for resume in ("false", "true"):
            err = fails_at_start(capsys, pretrain.main, [*args, f"resume={resume}"])
            assert f"in use by a run (pid {holder.pid} on {socket.gethostname()}" in err
        assert not list(tmp_path.glob("r.*")) and (tmp_path / "r" / "checkpoints").is_dir()  # not moved aside
    finally:
        holder.kill()
        holder.wait()
    pretrain.main([*args, "resume=true", "train.steps=3", "train.save_every=3"])
    out = capsys.readouterr().out
    assert "taken over" in out and f"resumed {tmp_path / 'r'} at step 2" in out


def test_an_out_dir_that_cannot_be_written_is_one_line(tmp_path, corpus, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    err = fails_at_start(capsys, pretrain.main, [f"out_dir={blocker / 'runs'}", "run_name=r", f"data.source={corpus}",
                                                 "data.heldout_fraction=0.2", *TINY])
    assert f"out_dir={blocker / 'runs'}: cannot write" in err and "[Errno 20]" in err


def test_base_that_is_not_a_model_fails_before_ray(tmp_path, corpus, capsys):
    import ray

    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "config.json").write_text("{}")
    err = fails_at_start(capsys, rlp_midtrain.main, [f"out_dir={tmp_path}", f"base={tmp_path / 'notamodel'}",
                                                     f"data.source={corpus}", *TINY])
    assert f"base={tmp_path / 'notamodel'} is not a loadable model directory" in err and "model.safetensors" in err
    assert not ray.is_initialized()


def test_tokenizer_larger_than_the_model_vocabulary_fails_naming_both(tmp_path, corpus, capsys):
    tok = train_tokenizer([json.loads(line)["text"] for line in corpus.read_text().splitlines()], vocab_size=300)
    tok.save_pretrained(tmp_path / "pre" / "tokenizer")  # beside the base, as ttt_pretrain saves it
    PonderForCausalLM(PonderConfig(vocab_size=len(tok) - 20, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64)).save_pretrained(tmp_path / "pre" / "model")
    err = fails_at_start(capsys, rlp_midtrain.main, [f"out_dir={tmp_path}", f"base={tmp_path / 'pre' / 'model'}",
                                                     f"data.source={corpus}", "data.heldout_fraction=0.2", *TINY])
    assert f"the tokenizer has {len(tok)} tokens" in err and f"vocab_size={len(tok) - 20}" in err


def test_submitted_job_outputs_go_to_a_durable_path(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert outputs_root("runs") == tmp_path / "runs"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray sets in a submitted job's driver
    monkeypatch.setenv("PONDER_HOME", str(tmp_path / "home"))
    assert outputs_root("runs") == tmp_path / "home" / "runs"
    assert outputs_root(str(tmp_path / "abs")) == tmp_path / "abs"
    monkeypatch.delenv("PONDER_HOME")
    assert outputs_root("runs") == (outputs_root("~") / "ponder" / "runs")


def test_a_submitted_jobs_driver_trains_on_every_core_it_may_use(monkeypatch):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what OMP_NUM_THREADS=1, which Ray gives a job's driver, leaves
        monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
        driver_threads()
        assert torch.get_num_threads() == 1  # a driver started by hand keeps what its user set
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
        driver_threads()
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(threads)


def test_worker_pythonpath_keeps_the_users_entries(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/a", "/b"]))
    assert worker_pythonpath("/repo").split(os.pathsep) == ["/repo", "/a", "/b"]
