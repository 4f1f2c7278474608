"""Data, training and scoring shared by the small-scale reproductions (`reproduce_small`, `posthoc_tying`).

Run the reproductions from the repository root as modules, e.g. `python -m experiments.reproduce_small`; see
`docs/RESULTS.md`. They need `apt-get install bible-kjv dict-devil` and `../shared/data/blimp`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.data import token_blocks
from modeling_looped_moe.eval.loop_eval import loop_token_losses
from modeling_looped_moe.eval.routing import analyze_routing
from modeling_looped_moe.training.schedule import warmup_cosine
from modeling_looped_moe.training.trainer import optimizer_param_groups

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BLIMP = REPO_ROOT.parent / "shared" / "data" / "blimp"
BIBLE_COMMAND = ["bible", "-l0", "gen1:1-rev22:21"]
DEVIL_PATH = Path("/usr/share/dictd/devil.dict.dz")  # Debian `dict-devil`


def kjv_text() -> str:
    """The KJV from the `bible` command, verse numbers stripped; exits with a message if it is missing."""
    if shutil.which("bible") is None:
        sys.exit("error: the `bible` command is missing. Install it with `apt-get install bible-kjv`, "
                 "or pass --text FILE.")
    result = subprocess.run(BIBLE_COMMAND, capture_output=True, text=True, check=False)
    if result.returncode != 0 or len(result.stdout) < 1_000_000:
        sys.exit(f"error: `{' '.join(BIBLE_COMMAND)}` failed (exit {result.returncode}, "
                 f"{len(result.stdout)} characters): {result.stderr.strip()[:500]}")
    return re.sub(r"(?m)^ +\d+ ", "", result.stdout)


def devils_dictionary_text(path: Path = DEVIL_PATH) -> str:
    """Ambrose Bierce's *The Devil's Dictionary* (public domain) from Debian's `dict-devil`: the original text from its
    preface to the last entry, without the dictd header entries and the trailing alphabet line."""
    if not path.is_file():
        sys.exit(f"error: {path} is missing. Install it with `apt-get install dict-devil`, or pass --ood-text FILE "
                 "or --ood-text none.")
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:  # dictzip is gzip-compatible
        text = handle.read()
    start, end = text.find("PREFACE"), text.rfind("\n abcdefghijklmnopqrstuvwxyz")
    if start < 0 or end < start:
        sys.exit(f"error: {path} does not look like the Devil's Dictionary")
    return text[start:end].strip() + "\n"


def ood_text(option: str) -> tuple[str, str | None]:
    """The out-of-domain evaluation text of `--ood-text` (`devil`, `none` or a file) and its description."""
    if option == "none":
        return "none", None
    if option == "devil":
        return f"The Devil's Dictionary ({DEVIL_PATH}, Debian dict-devil)", devils_dictionary_text()
    return f"file {option}", Path(option).read_text(encoding="utf-8", errors="replace")


def split_chapters(text: str, held_out_fraction: float) -> tuple[str, str, str]:
    """Hold out the last whole chapters of the KJV (at least `held_out_fraction` of the characters).

    Returns:
        (train text, held-out text, first held-out chapter heading).
    """
    headings = [m.start() for m in re.finditer(r"(?m)^[1-3A-Z][A-Za-z ]*[A-Za-z] \d+$", text)]
    if len(headings) < 100:
        raise ValueError(f"found only {len(headings)} chapter headings; is this the KJV?")
    limit = len(text) * (1 - held_out_fraction)
    cut = max(start for start in headings if start <= limit)
    return text[:cut], text[cut:], text[cut:].splitlines()[0]


def load_blimp(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """`{paradigm: [(sentence_good, sentence_bad), ...]}` from BLiMP-format `*.jsonl` files."""
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        sys.exit(f"error: no BLiMP *.jsonl files in {folder}")
    pairs = {}
    for path in files:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        pairs[path.stem] = [(row["sentence_good"], row["sentence_bad"]) for row in rows]
    return pairs


def encode_data(tokenizer, train_text: str, held_text: str, args: argparse.Namespace,
                other_text: str | None = None) -> dict:
    """Token blocks of the training, held-out and (optional) out-of-domain text and the BLiMP pairs, with `tokenizer`.

    Uses `args.block_size`, `args.max_held_out_blocks` (also the limit for the out-of-domain blocks), `args.blimp_path`
    and `args.max_blimp_pairs`. Each BLiMP sentence is prefixed with a newline token (KJV verses start after one).
    """
    blimp = load_blimp(Path(args.blimp_path))
    prefix = tokenizer.encode("\n", add_special_tokens=False)
    blimp_ids = {
        paradigm: [(prefix + tokenizer.encode(g, add_special_tokens=False),
                    prefix + tokenizer.encode(b, add_special_tokens=False)) for g, b in pairs[: args.max_blimp_pairs]]
        for paradigm, pairs in blimp.items()
    }
    return {
        "train_blocks": token_blocks(tokenizer(train_text)["input_ids"], args.block_size),
        "held_blocks": token_blocks(tokenizer(held_text)["input_ids"], args.block_size)[: args.max_held_out_blocks],
        "ood_blocks": None if other_text is None else
        token_blocks(tokenizer(other_text)["input_ids"], args.block_size)[: args.max_held_out_blocks],
        "vocab_size": len(tokenizer), "blimp_ids": blimp_ids, "blimp_prefix_len": len(prefix),
    }


def block_order(num_blocks: int, needed: int, seed: int) -> torch.Tensor:
    """`needed` block indices: seeded permutations of all blocks, one epoch after another."""
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(needed / num_blocks)
    return torch.cat([torch.randperm(num_blocks, generator=generator) for _ in range(epochs)])[:needed]


def lm_loss_of(model: LoopedMoeForCausalLM, output) -> torch.Tensor:
    """The language-model part of the training loss (router losses taken out), for logging."""
    loss = output.loss
    if output.aux_loss is not None:
        loss = loss - model.config.router_aux_loss_coef * output.aux_loss - model.config.router_z_loss_coef * output.z_loss
    return loss


def held_out_loss(model: LoopedMoeForCausalLM, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over every predicted position of the blocks, at full depth."""
    nll, _ = loop_token_losses(model, blocks, batch_size, progress=False)
    return nll[-1].double().mean().item()


@torch.no_grad()
def sentence_logprobs(model: LoopedMoeForCausalLM, sequences: list[list[int]], prefix_len: int,
                      batch_size: int = 256) -> list[float]:
    """Total log-probability of each sequence's tokens after its first `prefix_len` tokens (batched by length)."""
    scores = [0.0] * len(sequences)
    by_length: dict[int, list[int]] = {}
    for idx, seq in enumerate(sequences):
        by_length.setdefault(len(seq), []).append(idx)
    for length, indices in sorted(by_length.items()):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            ids = torch.tensor([sequences[i] for i in chunk], dtype=torch.long)
            logprobs = model(ids).logits[:, :-1].float().log_softmax(-1)
            token_lp = logprobs.gather(-1, ids[:, 1:, None])[..., 0][:, prefix_len - 1 :].sum(-1)
            for i, value in zip(chunk, token_lp.tolist()):
                scores[i] = value
    return scores


def blimp_accuracy(model: LoopedMoeForCausalLM, blimp_ids: dict[str, list[tuple[list[int], list[int]]]],
                   prefix_len: int) -> dict[str, float]:
    """Accuracy per paradigm: fraction of pairs whose good sentence has the higher log-likelihood."""
    accuracy = {}
    for paradigm, pairs in blimp_ids.items():
        good = sentence_logprobs(model, [g for g, _ in pairs], prefix_len)
        bad = sentence_logprobs(model, [b for _, b in pairs], prefix_len)
        accuracy[paradigm] = sum(g > b for g, b in zip(good, bad)) / len(pairs)
    return accuracy


def evaluate(model: LoopedMoeForCausalLM, data: dict) -> dict:
    """Held-out loss, out-of-domain loss (`None` without such blocks) and BLiMP accuracy per paradigm and mean, on
    the blocks and pairs of a data file (see `encode_data`)."""
    blimp = blimp_accuracy(model, data["blimp_ids"], data["blimp_prefix_len"])
    ood = data.get("ood_blocks")
    return {"held_out_loss": held_out_loss(model, data["held_blocks"], batch_size=32),
            "ood_loss": None if ood is None else held_out_loss(model, ood, batch_size=32),
            "blimp": blimp, "blimp_mean": sum(blimp.values()) / len(blimp)}


def routing_summary(report: dict) -> dict:
    """Loops 1 vs 2 top-k agreement per layer and loop 1's JSD to the final output, from an `analyze_routing` report."""
    pairs = [
        {"layer": p["layer"], "identical": p["identical"], "disjoint": p["disjoint"], "mean_overlap": p["mean_overlap"]}
        for p in report["loop_pairs"] if p["loop_a"] == 1 and p["loop_b"] == 2
    ]
    jsd = next((c for c in report["loop_convergence"] if c["loop"] == 1), None)
    max_load = [e["max_over_uniform"] for e in report["expert_load"]]
    return {
        "num_tokens": report["num_tokens"],
        "loop1_vs_loop2": pairs,
        "identical_mean": sum(p["identical"] for p in pairs) / len(pairs),
        "disjoint_mean": sum(p["disjoint"] for p in pairs) / len(pairs),
        "loop1_jsd_to_final_mean": jsd["jsd_to_final_mean"] if jsd else None,
        "loop1_jsd_to_final_std": jsd["jsd_to_final_std"] if jsd else None,
        "expert_load_max_over_uniform_mean": sum(max_load) / len(max_load),
    }


def scores(model: LoopedMoeForCausalLM, data: dict, args: dict) -> dict:
    """Every evaluation of a trained model: `evaluate`, perplexities, token counts, and for looped MoE models the
    routing summary on the first `args["routing_blocks"]` held-out blocks."""
    start = time.perf_counter()
    result = evaluate(model, data)
    config = model.config
    routing = None
    if config.num_experts > 0 and config.num_loops > 1:
        routing = routing_summary(analyze_routing(model, data["held_blocks"][: args["routing_blocks"]], batch_size=8))
    ood = data.get("ood_blocks")
    result.update(
        held_out_perplexity=math.exp(result["held_out_loss"]),
        held_out_tokens=int(data["held_blocks"][:, 1:].numel()),
        ood_perplexity=None if ood is None else math.exp(result["ood_loss"]),
        ood_tokens=None if ood is None else int(ood[:, 1:].numel()),
        routing=routing, eval_seconds=time.perf_counter() - start,
    )
    return result


def train_steps(model: LoopedMoeForCausalLM, train_blocks: torch.Tensor, order: torch.Tensor, args: dict, desc: str,
                position: int = 0) -> tuple[list[dict], float]:
    """AdamW over `args["steps"]` batches of `args["batch_size"]` blocks taken from `train_blocks` in `order`.

    Peak learning rate `args["lr"]` (tied expert banks get lr / sqrt(g) through `optimizer_param_groups`), linear
    warm-up over `args["warmup_fraction"]` of the steps then cosine decay to 0, gradient clipping 1.0.

    Returns:
        The log (`step`, mean `lm_loss` since the last entry, `seconds`) and the training time in seconds.
    """
    steps, batch_size, lr = args["steps"], args["batch_size"], args["lr"]
    warmup = max(1, round(args["warmup_fraction"] * steps))
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, lr, args["weight_decay"]), lr=lr, betas=(0.9, 0.95))
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    model.train()
    log, window = [], []
    progress = tqdm(range(steps), desc=desc, position=position, leave=True, mininterval=2.0, dynamic_ncols=True)
    start = time.perf_counter()
    for step in progress:
        factor = warmup_cosine(step, warmup, step - warmup, max(1, steps - warmup))  # decay after the warm-up
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        batch = train_blocks[order[step * batch_size : (step + 1) * batch_size]]
        output = model(batch, labels=batch)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window.append(lm_loss_of(model, output).item())
        if (step + 1) % args["log_every"] == 0 or step + 1 == steps:
            log.append({"step": step + 1, "lm_loss": sum(window) / len(window), "seconds": time.perf_counter() - start})
            progress.set_postfix(loss=f"{log[-1]['lm_loss']:.3f}")
            window = []
    progress.close()
    model.eval()
    return log, time.perf_counter() - start


def write_results(out: Path, setup: dict, models: list[dict], tables: str) -> None:
    """Writes `results.json` and `results.md` into `out` and prints the tables."""
    (out / "results.json").write_text(json.dumps({"setup": setup, "models": models}, indent=2) + "\n")
    (out / "results.md").write_text(tables + "\n")
    print()
    print(tables)
    seconds = setup.get("evaluate_only_wall_seconds", setup["wall_seconds"])
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'} ({seconds:.0f} s)")
