"""`looped-moe-train --fsdp`: the train command shards with FSDP2 under `torchrun` and `accelerate launch` (gloo, CPU).

One run under `torchrun --nproc_per_node 2` (4 steps of 2 blocks per process, random loop counts, router losses, a
sharded checkpoint after step 2, held-out loss at the end) is compared with the same loop (`train_steps`) run in this
process without FSDP on the same micro-batches (one process accumulating 2 micro-batches of 2): per-step losses within
1e-5 (fp32; the router losses are per-micro-batch means, so both runs compute them on the same micro-batches). A second
run under `accelerate launch --multi_gpu --num_processes 2` resumes from the first run's `checkpoint-2` and repeats
steps 3 and 4 (losses within 1e-5) and the final weights (within 1e-5). A launch of one process is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, HfArgumentParser

from conftest import free_port
from modeling_looped_moe.training.command import main
from modeling_looped_moe.training.data import ModelDataArguments

STEPS = 4
COMMON = ["--preset", "tiny", "--block_size", "32", "--max_steps", str(STEPS), "--logging_steps", "1",
          "--learning_rate", "1e-2", "--min_train_loops", "1", "--router_aux_loss_coef", "0.02", "--seed", "0",
          "--torch_num_threads", "1", "--use_cpu", "true", "--tokenizer_vocab_size", "256",
          "--per_device_train_batch_size", "2", "--disable_tqdm", "true"]


def _launch(command: list[str], tmp_path: Path, name: str) -> str:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", GLOO_SOCKET_IFNAME="lo")
    result = subprocess.run([sys.executable, *command], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=300)
    (tmp_path / f"{name}.log").write_text(result.stdout)
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def _losses(folder: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in json.loads((folder / "log_history.json").read_text())}


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory) -> dict:
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("fsdp_command")
    text = root / "text.txt"
    text.write_text("\n\n".join(topics[name] for name in sorted(topics))[:30_000], encoding="utf-8")
    common = [*COMMON, "--text_files", str(text)]
    output = _launch(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                      "-m", "modeling_looped_moe.training", "--fsdp", *common, "--eval_fraction", "0.1",
                      "--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(root / "run")],
                     root, "torchrun")
    return {"root": root, "common": common, "output": output, "run": root / "run"}


def _reference_losses(common: list[str], run: Path) -> dict[int, float]:
    """The same loop, steps and micro-batches in one process without FSDP: 2 accumulated micro-batches of 2."""
    from transformers import AutoTokenizer

    from modeling_looped_moe.training.data import build_model, load_documents, tokenize_blocks
    from modeling_looped_moe.training.fsdp_train import build_scheduler, train_steps
    from modeling_looped_moe.training.trainer import LoopedMoeTrainingArguments, build_optimizer

    parser = HfArgumentParser((ModelDataArguments, LoopedMoeTrainingArguments))
    data_args, args = parser.parse_args_into_dataclasses(args=[*common, "--eval_fraction", "0.1",
                                                               "--gradient_accumulation_steps", "2",
                                                               "--output_dir", str(run.parent / "ref")])
    tokenizer = AutoTokenizer.from_pretrained(run)  # trained by rank 0 of the launch
    blocks, _ = tokenize_blocks(tokenizer, load_documents(data_args), data_args.block_size)
    torch.manual_seed(args.seed)
    model = build_model(data_args, tokenizer).train()
    optimizer = build_optimizer(model, args)
    losses = {}
    train_steps(model, optimizer, build_scheduler(optimizer, args, STEPS), blocks, args, 0, STEPS,
                on_step_end=lambda step, logs: losses.update({step: logs["loss"]}))
    return losses


def test_torchrun_fsdp_matches_one_process(torchrun_run):
    run, output = torchrun_run["run"], torchrun_run["output"]
    assert output.count("FSDP2 over 2 processes (gloo)") == 1  # printed by rank 0 only
    assert "held-out loss" in output
    sharded = _losses(run)
    reference = _reference_losses(torchrun_run["common"], run)
    assert sorted(sharded) == sorted(reference) == list(range(1, STEPS + 1))
    for step in reference:
        assert abs(sharded[step] - reference[step]) <= 1e-5, (step, sharded, reference)
    assert reference[STEPS] < reference[1] - 0.1  # it learns (lr 1e-2): the losses compared move

    checkpoint = run / "checkpoint-2"
    assert sorted(path.name for path in checkpoint.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                                   "training_state.pt"]  # a shard per process
    model, info = AutoModelForCausalLM.from_pretrained(run, output_loading_info=True)
    assert not any(info.values()), info
    assert (run / "tokenizer.json").is_file()


def test_accelerate_launch_resumes_sharded_checkpoint(torchrun_run):
    """`accelerate launch` sets the same environment as `torchrun`; the run resumes after step 2 and repeats the
    rest of the first run: losses and final weights within 1e-5."""
    root, first = torchrun_run["root"], torchrun_run["run"]
    resumed = root / "resumed"
    _launch(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
             "-m", "modeling_looped_moe.training", "--fsdp", *torchrun_run["common"], "--eval_fraction", "0.1",
             "--tokenizer_name_or_path", str(first), "--resume_from_checkpoint", str(first / "checkpoint-2"),
             "--output_dir", str(resumed)], root, "accelerate")
    again, losses = _losses(resumed), _losses(first)
    assert sorted(again) == list(range(1, STEPS + 1))  # steps 1-2 from the checkpoint's log history
    for step in range(3, STEPS + 1):
        assert abs(again[step] - losses[step]) <= 1e-5, (step, again, losses)
    weights, first_weights = load_file(resumed / "model.safetensors"), load_file(first / "model.safetensors")
    assert weights.keys() == first_weights.keys()
    for key, tensor in weights.items():
        torch.testing.assert_close(tensor, first_weights[key], atol=1e-5, rtol=0, msg=key)


def test_fsdp_refuses_one_process(tmp_path, monkeypatch):
    """No silent fallback: --fsdp without a distributed launch stops before loading anything."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node N"):
        main(["--fsdp", "--use_cpu", "true", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
