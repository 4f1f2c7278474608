"""The train command: runs from a preset and reloads with the Auto classes; tied-bank learning rates; loop sampling."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import small_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_looped_moe import LoopedMoeForCausalLM, load_preset
from modeling_looped_moe.command_line import parse_key_values
from modeling_looped_moe.training.data import (
    ModelDataArguments,
    load_documents,
)
from modeling_looped_moe.training.command import main
from modeling_looped_moe.training.schedule import warmup_cosine
from modeling_looped_moe.training.trainer import (
    BlockDataset,
    LoopedMoeTrainer,
    LoopedMoeTrainingArguments,
    bank_group_sizes,
    optimizer_param_groups,
    sample_exit_loop,
)


def _text_file(tmp_path, chars: int = 40_000):
    from pydoc_data.topics import topics

    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(topics[name] for name in sorted(topics))[:chars], encoding="utf-8")
    return path


def _args(tmp_path, **overrides) -> LoopedMoeTrainingArguments:
    fields = {"output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 4,
              "logging_steps": 1, "use_cpu": True, "disable_tqdm": True, "seed": 0, "learning_rate": 1e-2,
              "warmup_steps": 0}
    fields.update(overrides)
    return LoopedMoeTrainingArguments(**fields)


def test_train_command_from_preset_reloads_with_auto_classes_and_generates(tmp_path):
    """A few steps from the `tiny` preset with the papers' options; the folder reloads with Auto classes."""
    text = _text_file(tmp_path)
    out = tmp_path / "run"
    code = main([
        "--preset", "tiny", "--text_files", str(text), "--output_dir", str(out), "--max_steps", "4",
        "--per_device_train_batch_size", "4", "--block_size", "32", "--logging_steps", "2", "--tokenizer_vocab_size",
        "384", "--min_train_loops", "1", "--loop_loss_weights", "0.5", "1.0", "--router_z_loss_coef", "0.002",
        "--config_overrides", "per_loop_router=true", "--disable_tqdm", "true", "--use_cpu", "true",
        "--torch_num_threads", "1",
    ])
    assert code == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(model, LoopedMoeForCausalLM)
    config = model.config
    assert config.vocab_size == len(tokenizer) and config.eos_token_id == tokenizer.eos_token_id
    assert config.loop_loss_weights == [0.5, 1.0] and config.router_z_loss_coef == 0.002 and config.per_loop_router
    prompt = tokenizer("The for statement", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 5)
    logs = json.loads((out / "log_history.json").read_text())
    steps = [row for row in logs if "loss" in row]
    assert len(steps) == 2 and all(math.isfinite(row["loss"]) for row in steps)
    assert all("tokens_per_second" in row and 1 <= row["mean_loops"] <= 2 for row in steps)
    assert all("aux_loss" in row and "z_loss" in row for row in steps)


def test_bank_group_sizes_count_unique_layers_not_loops():
    """Loops reapply a layer without counting it again; tying groups count every unique MoE layer."""
    tied = load_preset("tiny")  # MoE layers 0..3: anchor, tied pair, anchor
    assert bank_group_sizes(tied) == {0: 1, 1: 2, 2: 1}
    looped = small_config(num_prelude_layers=0, num_coda_layers=0, num_loop_layers=4, num_loops=3,
                          expert_tying_group_size=4)
    assert bank_group_sizes(looped) == {0: 4}
    assert bank_group_sizes(small_config(num_loops=5)) == {0: 1, 1: 1, 2: 1, 3: 1}


@pytest.mark.parametrize("divisor", [True, False])
def test_tied_bank_lr_divisor_is_in_the_optimizer_groups(tmp_path, divisor):
    """The Trainer's optimizer gives a bank shared by g = 4 layers lr / 2, and keeps the ratio through the schedule."""
    config = small_config(num_prelude_layers=1, num_coda_layers=1, num_loop_layers=4, num_loops=2,
                          expert_tying_group_size=4, num_untied_first_layers=1, num_untied_last_layers=1)
    model = LoopedMoeForCausalLM(config)
    trainer = LoopedMoeTrainer(model=model, args=_args(tmp_path, tied_bank_lr_divisor=divisor, warmup_steps=2),
                               train_dataset=BlockDataset(torch.randint(3, 96, (8, 16))))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    groups = trainer.optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        group_names = [names[id(p)] for p in group["params"]]
        tied = [n for n in group_names if n.startswith("model.expert_banks.1.")]
        expected = 1e-2 / 2 if divisor and tied else 1e-2
        assert group["initial_lr"] == pytest.approx(expected), (group["name"], group_names)
        if divisor and tied:  # a tied bank never shares a group with other parameters
            assert len(tied) == len(group_names)
        assert group["weight_decay"] == (0.0 if all(p.ndim < 2 for p in group["params"]) else 0.1)
    bank_groups = [g for g in groups if g["bank_group_size"] == 4]
    assert (len(bank_groups) == 1) == divisor
    if divisor:
        assert bank_groups[0]["name"] == "tied_banks_g4_decay" and bank_groups[0]["lr_scale"] == 0.5
        for _ in range(3):
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
        plain = next(g for g in groups if g["bank_group_size"] == 1 and g["weight_decay"] > 0)
        assert bank_groups[0]["lr"] == pytest.approx(plain["lr"] / 2) and plain["lr"] > 0
    covered = sum(len(g["params"]) for g in groups)
    assert covered == len(list(model.parameters()))


def test_param_groups_match_any_wrapper_prefix():
    """Parameters are matched by `expert_banks.{b}.` anywhere in the name (FSDP / DDP wrappers add prefixes)."""

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._fsdp_wrapped_module = inner
            self.config = inner.config

    model = LoopedMoeForCausalLM(load_preset("tiny"))
    groups = optimizer_param_groups(Wrapper(model), 1.0, 0.0)
    tied = next(g for g in groups if g["bank_group_size"] == 2)
    assert tied["lr"] == pytest.approx(1 / math.sqrt(2))
    assert all(".expert_banks.1." in name for name in tied["param_names"]) and len(tied["param_names"]) == 2


def test_sample_exit_loop_is_seeded_per_step_and_covers_the_range():
    """Every process draws the same loop count for a step; all counts in range occur; bad ranges raise."""
    draws = [sample_exit_loop(3, step, 2, 4) for step in range(200)]
    assert draws == [sample_exit_loop(3, step, 2, 4) for step in range(200)]
    assert set(draws) == {2, 3, 4}
    assert draws != [sample_exit_loop(4, step, 2, 4) for step in range(200)]
    with pytest.raises(ValueError, match="min_train_loops"):
        sample_exit_loop(0, 0, 3, 2)


def test_sampled_loop_count_reaches_the_model(tmp_path):
    """With min_train_loops=1 on a 3-loop model, each step's loss is the model's loss at the sampled exit loop."""
    model = LoopedMoeForCausalLM(small_config(num_loops=3))
    blocks = torch.randint(3, 96, (4, 16))
    trainer = LoopedMoeTrainer(model=model, args=_args(tmp_path, min_train_loops=1, max_steps=6),
                               train_dataset=BlockDataset(blocks))
    model.train()
    batch = {"input_ids": blocks, "labels": blocks}
    for step in range(6):
        trainer.state.global_step = step
        loops = sample_exit_loop(0, step, 1, 3)
        expected = model(**batch, exit_loop=loops if loops < 3 else None).loss
        assert trainer.compute_loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    model.eval()  # evaluation always runs every loop
    assert trainer.compute_loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)


def test_wall_clock_limit_stops_training(tmp_path):
    """`max_train_seconds` stops the Trainer early, and its schedule ends at lr 0 on the time budget."""
    model = LoopedMoeForCausalLM(small_config())
    trainer = LoopedMoeTrainer(model=model, args=_args(tmp_path, max_steps=50, max_train_seconds=0.0),
                               train_dataset=BlockDataset(torch.randint(3, 96, (64, 16))))
    trainer.train()
    assert trainer.state.global_step == 1
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_time_capped_progress_bar_counts_seconds_toward_the_cap(tmp_path, capsys):
    """With `max_train_seconds` the progress bar runs toward the time cap (in seconds), not toward `max_steps`."""
    from transformers.trainer_callback import ProgressCallback

    model = LoopedMoeForCausalLM(small_config())
    args = _args(tmp_path, max_steps=10_000, max_train_seconds=2.0, disable_tqdm=False, logging_steps=1000)
    trainer = LoopedMoeTrainer(model=model, args=args, train_dataset=BlockDataset(torch.randint(3, 96, (64, 16))))
    assert not any(isinstance(callback, ProgressCallback) for callback in trainer.callback_handler.callbacks)
    trainer.train()
    assert 1 <= trainer.state.global_step < 10_000  # stopped by the clock, not the step budget (no speed assumed)
    bar = capsys.readouterr().err
    assert "/2 s" in bar and f"step {trainer.state.global_step}/10000" in bar, bar[-500:]
    assert "/10000 [" not in bar  # no bar toward the step budget


def test_documents_from_a_local_dataset_folder_and_overrides(tmp_path):
    """`--dataset_name` reads a local folder through `datasets`; overrides parse JSON values."""
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"text": f"Document number {i}. " * 20} for i in range(30)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    train, held_out = load_documents(ModelDataArguments(dataset_name=str(folder), eval_fraction=0.1))
    assert len(train) + len(held_out) == 30 and len(held_out) == 3
    assert parse_key_values(["num_loops=3", "loop_loss_weights=[0.5, 1]", "hidden_act=gelu"]) == {
        "num_loops": 3, "loop_loss_weights": [0.5, 1], "hidden_act": "gelu"}
    with pytest.raises(ValueError, match="key=value"):
        parse_key_values(["num_loops"])


def test_parse_key_values_takes_one_pair_or_comma_separated_pairs():
    """One rule for every `key=value` option: an item holds one pair or several joined by commas (a comma inside a
    value stays), values are JSON, else Python literals, else strings; a bad item is named."""
    assert parse_key_values(["num_loops=3", "blimp_path=../data/blimp,text_max_docs=50, exit_loop=None"]) == {
        "num_loops": 3, "blimp_path": "../data/blimp", "text_max_docs": 50, "exit_loop": None}
    assert parse_key_values(["loop_loss_weights=[0.5,1],per_loop_router=true", "rope={'type': 'x', 'factor': 2}"]) == {
        "loop_loss_weights": [0.5, 1], "per_loop_router": True, "rope": {"type": "x", "factor": 2}}
    assert parse_key_values(["hidden_act=gelu", "hidden_act=silu", "name=a,b", "empty="]) == {
        "hidden_act": "silu", "name": "a,b", "empty": ""}
    assert parse_key_values(None) == {}
    with pytest.raises(ValueError, match="'num_loops' in 'num_loops,hidden_act=gelu'"):
        parse_key_values(["num_loops,hidden_act=gelu"])
    with pytest.raises(ValueError, match="key=value"):
        parse_key_values(["=3"])


def test_warmup_cosine_schedule_and_the_time_capped_trainer_uses_it(tmp_path):
    """Linear warm-up to the peak, then cosine to 0 over the progress (clipped to [0, 1]); a time-capped Trainer far
    from its time budget follows it over the steps."""
    assert [warmup_cosine(step, 4, 0.0) for step in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_cosine(10, 4, 0.5) == pytest.approx(0.5) and warmup_cosine(10, 4, 1.0) == pytest.approx(0.0)
    assert warmup_cosine(10, 4, 30, 120) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))  # seconds of a budget
    assert warmup_cosine(0, 2, -3, 10) == 0.5 and warmup_cosine(10, 1, 2.0) == pytest.approx(0.0)
    trainer = LoopedMoeTrainer(model=LoopedMoeForCausalLM(small_config()),
                               args=_args(tmp_path, warmup_steps=2, max_train_seconds=1e6),
                               train_dataset=BlockDataset(torch.randint(3, 96, (8, 16))))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    for step in range(10):
        assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-2 * warmup_cosine(step, 3, step / 10)), step
        trainer.optimizer.step()
        trainer.lr_scheduler.step()


def test_main_job_writes_summary_and_plot(tmp_path):
    """The main job end to end at toy size: per-loop perplexity, exit sweep, JSON summary, PNG plot, sample."""
    from modeling_looped_moe.main_job import main as main_job

    out = tmp_path / "job"
    code = main_job(["--text", str(_text_file(tmp_path, 30_000)), "--train-seconds", "30", "--max-steps", "3",
                     "--vocab-size", "300", "--block-size", "32", "--batch-size", "4", "--eval-blocks", "4",
                     "--thresholds", "3", "6", "--gate-thresholds", "0.4", "0.9", "--sample-tokens", "4",
                     "--output-dir", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training"]["steps"] == 3 and summary["config"]["num_loops"] == 4
    assert [row["exit_loop"] for row in summary["per_loop"]] == [1, 2, 3, 4]
    assert [row["threshold"] for row in summary["entropy_sweep"]] == [3.0, 6.0]
    assert [row["threshold"] for row in summary["gate_sweep"]] == [0.9, 0.4]  # most conservative first
    assert summary["config"]["exit_gate"] is True
    for criterion in ("entropy", "gate"):
        assert all(0.0 <= row["compute_saved"] < 1.0 for row in summary[f"{criterion}_sweep"])
        assert summary["sample"][criterion]["threshold"] == summary[f"{criterion}_choice"]["chosen"]["threshold"]
        assert len(summary["sample"][criterion]["exit_loops"]) == 4
        assert 0.0 <= summary["sample"][criterion]["timed_compute_saved"] < 1.0
    for run in ("entropy", "gate", "full_depth"):  # the sample may stop at eos; the timed runs generate all 4 tokens
        assert 1 <= summary["sample"][run]["new_tokens"] <= 4
    assert (out / "main_job.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    assert saved.config.num_coda_layers == 0 and saved.model.exit_gate.weight.any()  # the jointly trained gate
