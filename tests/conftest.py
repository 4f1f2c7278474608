"""Shared fixtures and helpers: small random configs, deterministic seeds, fp32 on CPU, child processes, and the
conversion tests' source checkpoints. Test modules import helpers from here only, never from each other."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import modeling_looped_moe  # noqa: F401  (registers the Auto classes)
from modeling_looped_moe import LoopedMoeConfig, LoopedMoeForCausalLM
from modeling_looped_moe.conversion.families import SUPPORTED_MODEL_TYPES
from modeling_looped_moe.conversion.pipeline import ConversionOptions, convert_checkpoint
from modeling_looped_moe.conversion.source import SourceCheckpoint
from modeling_looped_moe.conversion.tying import bank_groups


# Tiny models run faster on one thread than on two contended ones, and results do not depend on timing.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent

# fp32 logits of two computations of the same function (save/load, another code path, another model holding the same
# weights) agree to this absolute tolerance, as in transformers' own tests: kernels round differently with the CPU
# (AVX2, AVX-512, AMX) and with memory layout (a reloaded checkpoint can differ by about 1e-6).
FP32_ATOL = 1e-5


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, name: str | None = None) -> None:
    """Assert float tensors agree within `FP32_ATOL`, the fp32 tolerance (also for copies of fp16/bf16 weights);
    bit-exact checks are kept for integer outputs such as token ids. `name` prefixes the failure message."""
    torch.testing.assert_close(actual, expected, atol=FP32_ATOL, rtol=0, msg=None if name is None else
                               lambda message: f"{name}: {message}")


# The child process must not be able to import the package, so that only the code copied into the saved folder can
# serve `trust_remote_code=True`. Running from `tmp_path` with `PYTHONPATH` unset already keeps the repository off
# `sys.path`, but an (editable) install would still expose the package through a `.pth` path entry or a
# setuptools meta-path finder. A finder placed first on `sys.meta_path` before anything else is imported refuses the
# top-level name `modeling_looped_moe` whatever the installation; the remote copy is imported by transformers as
# `transformers_modules.<folder>.modeling_looped_moe`, a different full name, so it is not affected.
HIDE_PACKAGE = textwrap.dedent(
    r'''
    import importlib.abc
    import sys

    class BlockLoopedMoe(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "modeling_looped_moe" or fullname.startswith("modeling_looped_moe."):
                raise ImportError(f"{fullname} is hidden from this process")
            return None

    sys.meta_path.insert(0, BlockLoopedMoe())
    try:
        import modeling_looped_moe  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("modeling_looped_moe must not be importable here")
    '''
)

# Child processes also check that our code (the package, or its copy in a checkpoint) uses nothing transformers
# deprecates: our modules' FutureWarning/DeprecationWarning become errors, and the deprecation messages transformers
# logs (once per process, e.g. for `past_key_values` after the 5.24 rename) fail the run at exit.
STRICT_DEPRECATIONS = textwrap.dedent(
    r'''
    import logging
    import os
    import traceback
    import warnings

    for _category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("error", category=_category, module=r".*looped_moe.*")

    class _Deprecations(logging.Handler):
        def emit(self, record):
            if "deprecat" in record.getMessage().lower():
                print(f"deprecation logged by transformers: {record.getMessage()}", file=sys.stderr)
                traceback.print_stack(file=sys.stderr)
                sys.stderr.flush()
                os._exit(3)

    logging.getLogger("transformers").addHandler(_Deprecations())
    '''
)


def run_child(script: str, args: list, tmp_path: Path, hide_package: bool, timeout: int = 300):
    """Run `script` (Python source) in a fresh child process from `tmp_path`, offline, with its own Hugging Face
    module cache and `STRICT_DEPRECATIONS`; with `hide_package` it cannot import `modeling_looped_moe`, so only code
    copied into a checkpoint can serve it. Asserts the child succeeds."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HF_MODULES_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="warning")
    prelude = (HIDE_PACKAGE if hide_package else "import sys\n") + STRICT_DEPRECATIONS
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script), *map(str, args)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def small_config(**overrides) -> LoopedMoeConfig:
    """A small looped, tied MoE config; override any field."""
    fields = dict(
        vocab_size=96,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        qk_norm="head",
        num_prelude_layers=1,
        num_loop_layers=2,
        num_loops=2,
        num_coda_layers=1,
        intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        router_z_loss_coef=1e-3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return LoopedMoeConfig(**fields)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


# ----------------------------------------------------------------------------------------------------------------
# Conversion tests: small random source checkpoints of every family, native looped models, and their helpers
# ----------------------------------------------------------------------------------------------------------------
FAMILIES = SUPPORTED_MODEL_TYPES
PAD, BOS, EOS = 0, 1, 2
VOCAB = 64
NUM_EXPERTS = 4
WORDS = ("the quick brown fox jumps over a lazy dog while seven small experts route every token through "
         "layers of tied banks and loops").split()


def family_model(family: str, num_layers: int = 4, seed: int = 0, **overrides) -> torch.nn.Module:
    """A small random transformers MoE causal LM of `family` with decisive (std 0.2) weights, in eval mode.

    Qwen2-MoE keeps its default q/k/v bias and has a gated shared expert; Qwen3-MoE has a dense layer
    (`mlp_only_layers=[2]`) between MoE layers. `overrides` change the shared config fields.
    """
    common = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=num_layers, max_position_embeddings=128, num_experts_per_tok=2,
                  pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    common.update(overrides)
    if family == "mixtral":
        model_class, config = MixtralForCausalLM, MixtralConfig(**common, head_dim=8, num_local_experts=NUM_EXPERTS,
                                                                intermediate_size=16)
    elif family == "qwen2_moe":
        model_class, config = Qwen2MoeForCausalLM, Qwen2MoeConfig(
            **common, num_experts=NUM_EXPERTS, moe_intermediate_size=16, intermediate_size=48,
            shared_expert_intermediate_size=24, norm_topk_prob=False)
    elif family == "qwen3_moe":
        model_class, config = Qwen3MoeForCausalLM, Qwen3MoeConfig(
            **common, head_dim=8, num_experts=NUM_EXPERTS, moe_intermediate_size=16, intermediate_size=48,
            norm_topk_prob=True, mlp_only_layers=[2])
    elif family == "olmoe":
        model_class, config = OlmoeForCausalLM, OlmoeConfig(**common, num_experts=NUM_EXPERTS, intermediate_size=16,
                                                            norm_topk_prob=False)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.2)
            else:
                param.normal_(0.0, 0.2)
    return model.eval()


def moe_block(model: torch.nn.Module, layer_idx: int) -> torch.nn.Module:
    """The sparse MoE block of a transformers model's layer (router `.gate`, fused `.experts`)."""
    return model.model.layers[layer_idx].mlp


def make_permuted_copies(model: torch.nn.Module, groups: list[list[int]], seed: int = 1) -> None:
    """Makes every layer of each group hold a random permutation of the group's first layer's experts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in groups:
            reference = moe_block(model, group[0]).experts
            for layer_idx in group[1:]:
                permutation = torch.randperm(NUM_EXPERTS, generator=generator)
                assert not torch.equal(permutation, torch.arange(NUM_EXPERTS))
                experts = moe_block(model, layer_idx).experts
                experts.gate_up_proj.copy_(reference.gate_up_proj[permutation])
                experts.down_proj.copy_(reference.down_proj[permutation])


def save_tokenizer(folder: Path) -> None:
    """A tiny word-level tokenizer (built locally with `tokenizers`) saved into `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(folder))


def save_source(model: torch.nn.Module, folder: Path, fused: bool = False, sharded: bool = False,
                dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> Path:
    """Saves `model` as a Hub-style checkpoint: per-expert (default) or fused keys, one file or sharded."""
    to_save = model if dtype == torch.float32 else model.to(dtype)
    kwargs = dict(save_original_format=not fused)
    if sharded:
        kwargs["max_shard_size"] = "60KB"
    to_save.save_pretrained(str(folder), **kwargs)
    if dtype != torch.float32:
        model.float()
    if tokenizer:
        save_tokenizer(folder)
    return folder


def convert(source: Path, output: Path | None, **options) -> dict:
    """`convert_checkpoint` without a progress bar or log output."""
    options.setdefault("progress", False)
    return convert_checkpoint(source, output, ConversionOptions(**options), log=lambda *args: None)


def tied_groups(source: Path, **tying) -> list[list[int]]:
    """The tying groups (layers sharing a bank, more than one) a conversion of `source` would use."""
    from modeling_looped_moe.conversion.families import build_looped_config

    config = build_looped_config(SourceCheckpoint(source).config_fields, **tying)
    return [layers for layers in bank_groups(config).values() if len(layers) > 1]


def source_groups(family: str, num_layers: int, **tying) -> list[list[int]]:
    """Tying groups for a family model, computed from a throw-away saved copy (no weights needed)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        save_source(family_model(family, num_layers), Path(folder), tokenizer=False)
        return tied_groups(Path(folder), **tying)


def random_ids(batch: int = 2, length: int = 11, seed: int = 1) -> torch.Tensor:
    """Random non-special token ids."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits."""
    return model(input_ids).logits.float()


@torch.no_grad()
def greedy(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int = 8) -> torch.Tensor:
    """Greedy continuation (new tokens only)."""
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=PAD)
    return output[:, input_ids.shape[1]:]


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary folders a conversion into `parent / name` may have left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def load_cli():
    """The conversion command's module (`looped-moe-convert`)."""
    from modeling_looped_moe.conversion import command

    return command


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Runs each conversion test on one torch thread (restored afterwards): the models are tiny, and several threads
    on small ops slow down sharply when other processes share the two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


NUM_LAYERS = 6


def tying(family: str) -> tuple[dict, dict]:
    """Config fields and conversion options of the tying tests: groups of 2 between one first and one last untied
    MoE layer (Qwen3-MoE, whose layer 2 is dense, has 5 MoE layers and no last anchor, so a group spans layer 2)."""
    last = 0 if family == "qwen3_moe" else 1
    fields = dict(expert_tying_group_size=2, num_untied_first_layers=1, num_untied_last_layers=last)
    options = dict(tie_group_size=2, num_untied_first_layers=1, num_untied_last_layers=last)
    return fields, options


# Four MoE layers between one untied first and one untied last layer: two groups of two at G = 2.
TYING = dict(tie_group_size=2, num_untied_first_layers=1, num_untied_last_layers=1)
TYING_FIELDS = dict(expert_tying_group_size=2, num_untied_first_layers=1, num_untied_last_layers=1)
LAYOUTS = {
    "plain": dict(num_prelude_layers=0, num_loop_layers=6, num_loops=1, num_coda_layers=0),
    "looped": dict(num_prelude_layers=1, num_loop_layers=4, num_loops=2, num_coda_layers=1, per_loop_router=True,
                   loop_conditioning="embedding"),
}


def native_model(layout: str, seed: int = 0, **overrides) -> LoopedMoeForCausalLM:
    """A small random `LoopedMoeForCausalLM` (`small_config` with the layout) with decisive (std 0.2) weights, in
    eval mode."""
    torch.manual_seed(seed)
    model = LoopedMoeForCausalLM(small_config(num_experts=NUM_EXPERTS, **{**LAYOUTS[layout], **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
    return model.eval()


def save_native(model: LoopedMoeForCausalLM, folder: Path) -> Path:
    """`save_pretrained` plus a tokenizer, as a training run leaves a model folder."""
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def free_port() -> int:
    """A free TCP port on loopback (for a child process group's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def close_process_group() -> None:
    """End a gloo worker's process group: wait for every rank, drop unreferenced objects, then destroy it.

    Destroying the group while another rank still has work in flight, or while dead objects still hold tensors that
    gloo's threads reference, can abort the exiting process ("terminate called without an active exception", SIGABRT)
    after its work is done; two of the suite's multi-process tests have hit this. No-op without a group.
    """
    import gc

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def run_gloo_workers(tmp_path: Path, module: str, worker: str, world_size: int = 2, while_waiting=lambda: None,
                     timeout: float = 300):
    """Run `<module>.<worker>(rank, tmp_path)` (a test module's function) in `world_size` processes with a
    torchrun-style environment on loopback (gloo), calling `while_waiting()` in this process meanwhile; kill any
    process still running at the end and assert every one succeeded. Returns `while_waiting()`'s result."""
    import time

    tests = Path(__file__).resolve().parent
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PYTHONPATH=str(tests), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
               GLOO_SOCKET_IFNAME="lo")
    code = f"import sys\nfrom {module} import {worker}\n{worker}(int(sys.argv[1]), sys.argv[2])"
    processes, logs = [], []
    try:
        for rank in range(world_size):
            log = open(tmp_path / f"rank{rank}.log", "w")
            logs.append(log)
            processes.append(subprocess.Popen(
                [sys.executable, "-c", code, str(rank), str(tmp_path)], cwd=tmp_path,
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT))
        result = while_waiting()
        deadline = time.monotonic() + timeout
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    outputs = "\n".join((tmp_path / f"rank{rank}.log").read_text()[-3000:] for rank in range(world_size))
    assert [process.returncode for process in processes] == [0] * world_size, outputs
    return result
