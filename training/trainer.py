"""Training with `transformers.Trainer`: random loop count per step, tied-bank learning rates, router-loss logging.

The pieces, each usable on its own:

- [`bank_group_sizes`] / [`optimizer_param_groups`]: optimizer parameter groups in which every expert bank shared by
  `g` MoE layers gets `lr / sqrt(g)` (Tying the Loop). Convention: `g` counts the *unique* MoE layers that refer to the
  bank in `config.expert_bank_map()`; a loop reapplying the same layer does not count again.
- [`sample_exit_loop`]: the random loop count of a training step. The model's `num_loops` is fixed when it is built;
  a step runs loops `1..k` (the model's `exit_loop` forward argument) with `k` drawn uniformly from
  `min_train_loops..num_loops`, seeded by `(seed, global_step)` so that every process of a distributed run draws the
  same `k`. Evaluation always runs every loop.
- [`LoopedMoeTrainer`]: a `Trainer` using both, logging `tokens_per_second`, the router losses and the mean loop
  count, and keeping the router losses correctly weighted when the Trainer normalises the language-model loss by the
  number of tokens across processes and accumulation steps.
- [`run_training`]: data, tokenizer, model, Trainer and saving, as the `looped-moe-train` command does it.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from modeling_looped_moe.configuration_looped_moe import LoopedMoeConfig
from modeling_looped_moe.conversion.tying import bank_groups
from modeling_looped_moe.training.schedule import warmup_cosine

_BANK_PARAMETER = re.compile(r"(?:^|\.)expert_banks\.(\d+)\.")


# ----------------------------------------------------------------------------------------------------------------------
# Tied-bank learning rates
# ----------------------------------------------------------------------------------------------------------------------
def bank_group_sizes(config: LoopedMoeConfig) -> dict[int, int]:
    """Number of unique MoE layers sharing each expert bank (loops reapplying a layer are not counted).

    Args:
        config: The model's configuration.

    Returns:
        `{bank_index: g}` for every bank in `config.expert_bank_map()`.
    """
    return {bank: len(layers) for bank, layers in bank_groups(config).items()}


def optimizer_param_groups(
    model: nn.Module, learning_rate: float, weight_decay: float, tied_bank_lr_divisor: bool = True
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: decay / no decay, and one group per expert-bank sharing size.

    Matrices (2-D or more) get `weight_decay`; vectors (norm scales, biases) get none. A parameter named
    `...expert_banks.{b}.*` of a bank shared by `g` layers gets `lr = learning_rate / sqrt(g)` when
    `tied_bank_lr_divisor` is true. Every group carries `name`, `lr_scale` and `bank_group_size` keys so that the
    divisor is visible in `optimizer.param_groups` (and the Trainer's scheduler keeps the ratio: it scales each
    group's initial `lr`).

    Args:
        model: A `LoopedMoeForCausalLM` (or a wrapper whose parameter names contain `expert_banks.{b}.`).
        learning_rate: The base learning rate.
        weight_decay: Weight decay of the matrices.
        tied_bank_lr_divisor: Apply `1 / sqrt(g)` to tied banks.

    Returns:
        Parameter groups for a `torch.optim` optimizer (empty groups are left out).
    """
    config = getattr(model, "config", None)
    sizes = bank_group_sizes(config) if config is not None and getattr(config, "num_experts", 0) > 0 else {}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        match = _BANK_PARAMETER.search(name)
        size = sizes.get(int(match.group(1)), 1) if match and tied_bank_lr_divisor else 1
        decay = param.ndim >= 2
        key = (size, decay)
        if key not in groups:
            scale = 1.0 / math.sqrt(size)
            label = "decay" if decay else "no_decay"
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr": learning_rate * scale,
                "lr_scale": scale,
                "bank_group_size": size,
                "name": label if size == 1 else f"tied_banks_g{size}_{label}",
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """The optimizer `args.optim` names (AdamW by default) over [`optimizer_param_groups`], as the Trainer builds it.

    Args:
        model: The model (sharded or not: groups go by parameter names).
        args: Training arguments: `optim`, `learning_rate`, `weight_decay`, the Adam settings and, for
            [`LoopedMoeTrainingArguments`], `tied_bank_lr_divisor`.
    """
    groups = optimizer_param_groups(model, args.learning_rate, args.weight_decay,
                                    getattr(args, "tied_bank_lr_divisor", True))
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer_kwargs.pop("lr", None)  # each group carries its own
    for group in groups:
        group.pop("param_names")
    return optimizer_cls(groups, **optimizer_kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Random loop count per step
# ----------------------------------------------------------------------------------------------------------------------
def sample_exit_loop(seed: int, step: int, min_loops: int, num_loops: int) -> int:
    """The loop count of training step `step`: uniform in `min_loops..num_loops`, the same on every process.

    Args:
        seed: The run's seed.
        step: The optimizer step (all micro-batches of one step share the draw).
        min_loops: Fewest loops a step may run (>= 1).
        num_loops: The model's `num_loops`.
    """
    if not 1 <= min_loops <= num_loops:
        raise ValueError(f"min_train_loops must be in 1..num_loops ({num_loops}), got {min_loops}")
    return random.Random(seed * 1_000_003 + step).randint(min_loops, num_loops)


@dataclass
class LoopedMoeTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the looped-MoE options and defaults suited to small CPU runs.

    Args:
        min_train_loops: Sample the loop count of every step uniformly in `min_train_loops..num_loops` (the model's
            `exit_loop` forward argument); `None` always runs every loop.
        tied_bank_lr_divisor: Divide the learning rate of an expert bank shared by `g` unique MoE layers by
            `sqrt(g)` (through optimizer parameter groups).
        max_train_seconds: Stop training (and save) after this many seconds of wall time; `None` for no limit.
            The learning-rate schedule then becomes warm-up + cosine over the budget closer to running out.
        torch_num_threads: `torch.set_num_threads` for each process (`None`: torch's default).
    """

    min_train_loops: int | None = field(
        default=None, metadata={"help": "Random loop count per step: uniform in min_train_loops..num_loops."}
    )
    tied_bank_lr_divisor: bool = field(
        default=True, metadata={"help": "Learning rate / sqrt(g) for an expert bank shared by g unique MoE layers."}
    )
    max_train_seconds: float | None = field(
        default=None, metadata={"help": "Stop training after this many seconds of wall time."}
    )
    torch_num_threads: int | None = field(
        default=None, metadata={"help": "torch.set_num_threads per process (small models: 1 is often fastest)."}
    )
    output_dir: str | None = field(default="outputs/train", metadata={"help": "Where the model is saved."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.1, metadata={"help": "Weight decay of the matrices."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (a float < 1 is a ratio)."})
    max_steps: int = field(default=200, metadata={"help": "Optimizer steps (-1: use num_train_epochs)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoints during training ('no': final only)."})
    eval_strategy: str = field(default="no", metadata={"help": "Evaluation during training ('no', 'steps')."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data-loading worker processes."})
    prediction_loss_only: bool = field(default=True, metadata={"help": "Evaluation returns the loss only."})


class _WallClockLimit(TrainerCallback):
    """Trainer callback stopping training after `seconds` of wall time.

    It also draws the training progress bar (replacing the Trainer's step bar, which would count toward a step
    budget a time-capped run does not reach): seconds toward the cap, with the steps done so far, on the main process
    unless `disable_tqdm`. Logs are written above the bar, as the Trainer's bar does.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start: float | None = None
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        if state.is_world_process_zero and not args.disable_tqdm:
            self.bar = tqdm(total=round(self.seconds), desc="training", unit="s",
                            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s{postfix}")

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.update(min(elapsed, self.seconds) - self.bar.n)
            self.bar.set_postfix_str(f"step {state.global_step}/{state.max_steps}", refresh=False)
        if elapsed > self.seconds:
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            self.bar.write(str({key: value for key, value in logs.items() if key != "total_flos"}))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LoopedMoeTrainer(Trainer):
    """`Trainer` for looped MoE models: random loop count per step, tied-bank learning rates, richer logs.

    Reads `min_train_loops` and `tied_bank_lr_divisor` from the arguments when they are
    [`LoopedMoeTrainingArguments`] (plain `TrainingArguments` mean: every loop, divisor on).
    Logs, besides `loss`: `lm_loss`, `aux_loss`, `z_loss`, `mean_loops` (loops run per step) and `tokens_per_second`
    (tokens of every process, over wall time since the previous log).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.fsdp and not self.is_fsdp_enabled:
            # accelerate switches FSDP on only for GPU-like devices: on CPU every rank would silently train the full
            # model under DDP. Refuse instead of running something other than what was asked for.
            raise ValueError(
                "FSDP was requested (TrainingArguments.fsdp / --fsdp) but "
                f"accelerate did not enable it on device type {self.args.device.type!r} (it shards only on GPU-like "
                "devices; here every process would hold and train the full model under DDP). To shard on CPU, "
                "run `torchrun --nproc_per_node N -m modeling_looped_moe.training --fsdp ...` (looped-moe-train "
                "shards with modeling_looped_moe.training.fsdp.apply_fsdp2 in its own loop then), or call apply_fsdp2 "
                "yourself instead of Trainer's fsdp option; or drop fsdp to train with DDP."
            )
        limit = getattr(self.args, "max_train_seconds", None)
        if limit is not None:
            self.remove_callback(ProgressCallback)  # the time cap's own bar replaces the step bar
            self.add_callback(_WallClockLimit(limit))
        self._reset_log_window()

    def _reset_log_window(self) -> None:
        self._window = defaultdict(float)
        self._window_start = time.perf_counter()

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW (or `args.optim`) over [`optimizer_param_groups`]."""
        if self.optimizer is None:
            self.optimizer = build_optimizer(self.model if model is None else model, self.args)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """The configured schedule, or with `max_train_seconds` a warm-up + cosine over the closer budget.

        With a wall-clock limit the schedule's progress is `max(step / num_training_steps, elapsed / seconds)`, so
        the learning rate reaches zero when either budget runs out (`lr_scheduler_type` is then ignored).
        """
        seconds = getattr(self.args, "max_train_seconds", None)
        if seconds is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        warmup = self.args.get_warmup_steps(num_training_steps)
        start: list[float] = []

        def factor(step: int) -> float:
            if not start:
                start.append(time.perf_counter())
            elapsed = (time.perf_counter() - start[0]) / seconds if seconds > 0 else 1.0
            return warmup_cosine(step, warmup + 1, max(step / max(1, num_training_steps), elapsed))

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        return self.lr_scheduler

    def _num_loops(self, model: nn.Module) -> int:
        return self.accelerator.unwrap_model(model).config.num_loops

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """The model's loss, with a sampled loop count in training and router losses weighted once per step.

        When the Trainer passes `num_items_in_batch`, the language-model loss is a sum over the whole accumulated,
        all-process batch divided by its token count, and the Trainer multiplies it by the number of processes
        (DDP averages gradients) and skips the division by the accumulation steps. The router losses are per
        micro-batch means, so they are taken out of that scaling and divided by the accumulation steps here;
        otherwise their weight would grow with the number of processes.
        """
        num_loops = self._num_loops(model)
        extra: dict[str, Any] = {}
        loops = num_loops
        min_loops = getattr(self.args, "min_train_loops", None)
        if model.training and min_loops is not None:
            loops = sample_exit_loop(self.args.seed, self.state.global_step, min_loops, num_loops)
            if loops < num_loops:
                extra["exit_loop"] = loops
        token_normalised = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        if token_normalised:
            extra["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs, **extra)
        config = self.accelerator.unwrap_model(model).config
        router = torch.zeros((), device=outputs.loss.device)
        if outputs.aux_loss is not None:
            router = router + config.router_aux_loss_coef * outputs.aux_loss.to(router.device)
        if outputs.z_loss is not None:
            router = router + config.router_z_loss_coef * outputs.z_loss.to(router.device)
        lm_loss = outputs.loss - router
        lm_scale = 1.0  # lm_loss * lm_scale is this micro-batch's mean token loss (for the logs)
        if token_normalised:
            lm_scale = self.current_gradient_accumulation_steps
            if self.args.average_tokens_across_devices:
                tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                lm_loss = lm_loss * (self.accelerator.num_processes // tp_size)
            router = router / self.current_gradient_accumulation_steps
        loss = lm_loss + router
        if model.training:
            window = self._window
            window["micro_batches"] += 1
            window["loops"] += loops
            window["tokens"] += inputs["input_ids"].numel() * self.accelerator.num_processes
            window["lm_loss"] += lm_loss.detach().item() * lm_scale
            if outputs.aux_loss is not None:
                window["aux_loss"] += outputs.aux_loss.detach().item()
            if outputs.z_loss is not None:
                window["z_loss"] += outputs.z_loss.detach().item()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add tokens/s, mean loop count and the router losses (this process, since the last log) to training logs."""
        window = self._window
        if "loss" in logs and window["micro_batches"] > 0:
            count = window["micro_batches"]
            elapsed = max(time.perf_counter() - self._window_start, 1e-9)
            logs["tokens_per_second"] = round(window["tokens"] / elapsed, 1)
            logs["mean_loops"] = round(window["loops"] / count, 3)
            logs["lm_loss"] = round(window["lm_loss"] / count, 5)
            if "aux_loss" in window:
                logs["aux_loss"] = round(window["aux_loss"] / count, 5)
            if "z_loss" in window:
                logs["z_loss"] = round(window["z_loss"] / count, 5)
            self._reset_log_window()
        super().log(logs, start_time)


# ----------------------------------------------------------------------------------------------------------------------
# The train command
# ----------------------------------------------------------------------------------------------------------------------
class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length token blocks as `{"input_ids", "labels"}` items (labels = inputs; the model shifts)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block.clone(), "labels": block.clone()}


@dataclass
class TrainResult:
    """What [`run_training`] returns.

    Args:
        trainer: The Trainer after training (its `state.log_history` holds the logs).
        model: The trained model (unwrapped).
        tokenizer: The tokenizer saved with it.
        train_blocks: Training token blocks `[n, block_size]`.
        eval_blocks: Held-out token blocks `[m, block_size]` (may be empty).
        output_dir: Where model and tokenizer were saved.
        train_seconds: Wall time of `trainer.train()`.
    """

    trainer: Trainer
    model: nn.Module
    tokenizer: Any
    train_blocks: torch.Tensor
    eval_blocks: torch.Tensor
    output_dir: Path
    train_seconds: float


def run_training(data_args, training_args: TrainingArguments) -> TrainResult:
    """Load text, get or train a tokenizer, build or load the model, train with [`LoopedMoeTrainer`], save.

    The output folder holds the model (with its code, for `trust_remote_code`), the tokenizer and the training logs
    (`log_history.json`), and loads with `AutoModelForCausalLM` / `AutoTokenizer`. Under several processes the main
    process trains the tokenizer first and the others load it from the output folder.

    Args:
        data_args: A [`modeling_looped_moe.training.data.ModelDataArguments`].
        training_args: [`LoopedMoeTrainingArguments`] (or plain `TrainingArguments`).
    """
    from modeling_looped_moe.training.data import build_model, load_documents, prepare_tokenizer, tokenize_blocks

    output_dir = Path(training_args.output_dir)
    if getattr(training_args, "torch_num_threads", None):
        torch.set_num_threads(training_args.torch_num_threads)
    documents = load_documents(data_args)
    with training_args.main_process_first(desc="tokenizer"):
        tokenizer = prepare_tokenizer(data_args, documents, output_dir, training_args.process_index == 0)
    train_blocks, eval_blocks = tokenize_blocks(tokenizer, documents, data_args.block_size)
    torch.manual_seed(training_args.seed)
    model = build_model(data_args, tokenizer)
    if training_args.process_index == 0:
        print(f"train blocks {tuple(train_blocks.shape)}, held-out blocks {tuple(eval_blocks.shape)}; "
              f"model {sum(p.numel() for p in model.parameters()):,} parameters, banks "
              f"{bank_group_sizes(model.config) if model.config.num_experts else {}} (bank: layers sharing it)")
    trainer = LoopedMoeTrainer(
        model=model,
        args=training_args,
        train_dataset=BlockDataset(train_blocks),
        eval_dataset=BlockDataset(eval_blocks) if len(eval_blocks) else None,
        processing_class=tokenizer,
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return TrainResult(trainer, trainer.accelerator.unwrap_model(trainer.model), tokenizer, train_blocks,
                       eval_blocks, output_dir, train_seconds)


__all__ = [
    "BlockDataset",
    "LoopedMoeTrainer",
    "LoopedMoeTrainingArguments",
    "TrainResult",
    "bank_group_sizes",
    "build_optimizer",
    "optimizer_param_groups",
    "run_training",
    "sample_exit_loop",
]
