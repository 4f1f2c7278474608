"""Generation from a checkpoint loaded with `trust_remote_code=True`, on the installed transformers version.

transformers 5.24 renamed the cache argument (`past_key_values` -> `cache`); remote code that reads only one name
decodes without its cache on the other versions and generates wrong tokens without any error. CI runs this module
on the oldest and the newest supported transformers. The child process cannot import the package, so only the code
copied into the checkpoint runs; it checks cached against uncached greedy decoding, a left-padded batch against its
rows generated alone, batched self-speculation, adaptive exit and the static cache, and returns its tokens to compare
with the package's.
"""

from __future__ import annotations

import json

import torch
from conftest import run_child, small_config

from modeling_looped_moe import LoopedMoeForCausalLM


NEW_TOKENS = 8
FIELDS = dict(
    initializer_range=0.1, num_loops=3, loop_conditioning="iter_adaln", eos_token_id=None,
    expert_tying_group_size=2, num_untied_first_layers=1, num_untied_last_layers=1,
)

CHECKS = r'''
import json
import sys

import torch
from transformers import AutoModel, AutoModelForCausalLM

folder, out_path = sys.argv[1:3]
NEW_TOKENS = int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
assert "modeling_looped_moe" not in sys.modules
config = model.config
base = AutoModel.from_pretrained(folder, trust_remote_code=True)  # `auto_map` names the base model too
assert type(base).__name__ == "LoopedMoeModel" and type(base).__module__.startswith("transformers_modules.")

ids = torch.randint(3, config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
mask = torch.ones_like(ids)
mask[1, :2] = 0
mask[2, :4] = 0
ids = ids.masked_fill(mask == 0, config.pad_token_id)


def generate(input_ids, attention_mask, **kwargs):
    return model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, return_dict_in_generate=True, **kwargs)


def returned_cache(out):
    name = "cache" if "cache" in type(out).__dataclass_fields__ else "past_key_values"  # renamed in 5.24
    return out.get(name)


def new_tokens(out, prompt_length):
    return out.sequences[:, prompt_length:]


cached = generate(ids, mask)
uncached = generate(ids, mask, use_cache=False)
assert torch.equal(cached.sequences, uncached.sequences), (cached.sequences, uncached.sequences)
assert type(returned_cache(cached)).__name__ == "DynamicCache"
for row in range(ids.shape[0]):
    keep = mask[row].bool()
    alone = generate(ids[row : row + 1, keep], mask[row : row + 1, keep])
    assert torch.equal(new_tokens(alone, int(keep.sum()))[0], new_tokens(cached, ids.shape[1])[row]), row

# Batched self-speculation (`generate(assistant_early_exit=k)` runs the fast path for batches) equals full depth.
speculative = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                             assistant_early_exit=1, num_assistant_tokens=3)
assert torch.equal(speculative, cached.sequences), (speculative, cached.sequences)

static = generate(ids, mask, cache_implementation="static")
assert type(returned_cache(static)).__name__ == "StaticCache"
assert torch.equal(static.sequences, cached.sequences)

# Adaptive exit: a threshold that always fires equals the static exit after loop 1, one that never fires equals full
# depth; a threshold in between exits rows at different loops, and a batch equals its rows alone.
always = generate(ids, mask, exit_criterion="entropy", exit_threshold=1e9)
assert torch.equal(always.sequences, generate(ids, mask, exit_loop=1).sequences)
assert bool((always.exit_loops == 1).all()) and always.compute_saved > 0
never = generate(ids, mask, exit_criterion="entropy", exit_threshold=-1.0)
assert torch.equal(never.sequences, cached.sequences)
assert bool((never.exit_loops == config.num_loops).all()) and never.compute_saved <= 0
with torch.no_grad():
    entropies = []
    loop_logits = model(ids, attention_mask=mask, output_loop_logits=True).loop_logits
    for logits in loop_logits:
        log_probs = torch.log_softmax(logits[:, -1].float(), dim=-1)
        entropies.append(-(log_probs.exp() * log_probs).sum(-1))
threshold = float(torch.cat(entropies).median())
adaptive = generate(ids, mask, exit_criterion="entropy", exit_threshold=threshold)
for row in range(ids.shape[0]):
    keep = mask[row].bool()
    alone = generate(ids[row : row + 1, keep], mask[row : row + 1, keep], exit_criterion="entropy",
                     exit_threshold=threshold)
    assert torch.equal(new_tokens(alone, int(keep.sum()))[0], new_tokens(adaptive, ids.shape[1])[row]), row
    assert torch.equal(alone.exit_loops[0], adaptive.exit_loops[row]), row

# Cache slots shared across loops, as a generate keyword; "first" decodes as it recomputes without a cache.
shared = {rule: generate(ids, mask, kv_sharing=rule).sequences.tolist() for rule in ("last", "first")}
assert shared["first"] == generate(ids, mask, kv_sharing="first", use_cache=False).sequences.tolist()

with open(out_path, "w") as handle:
    json.dump({
        "shared": shared,
        "ids": ids.tolist(), "mask": mask.tolist(), "threshold": threshold,
        "cached": cached.sequences.tolist(), "adaptive": adaptive.sequences.tolist(),
        "adaptive_exit_loops": adaptive.exit_loops.tolist(),
    }, handle)
'''


def test_remote_code_generation_on_this_transformers(tmp_path):
    """Remote code generates correctly (cache, padding, static cache, adaptive exit) and as the package does."""
    torch.manual_seed(0)
    model = LoopedMoeForCausalLM(small_config(**FIELDS)).eval()
    with torch.no_grad():  # give IterAdaLN's zero-initialised modulation an effect, so it is exercised
        for name, parameter in model.named_parameters():
            if "modulation" in name:
                parameter.normal_(0.0, 0.1)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    out_path = tmp_path / "remote.json"
    run_child(CHECKS, [folder, out_path, NEW_TOKENS], tmp_path, hide_package=True)
    remote = json.loads(out_path.read_text())

    ids, mask = torch.tensor(remote["ids"]), torch.tensor(remote["mask"])
    common = dict(attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert model.generate(ids, **common).tolist() == remote["cached"]
    adaptive = model.generate(ids, exit_criterion="entropy", exit_threshold=remote["threshold"],
                              return_dict_in_generate=True, **common)
    assert adaptive.sequences.tolist() == remote["adaptive"]
    assert adaptive.exit_loops.tolist() == remote["adaptive_exit_loops"]
    for rule, sequences in remote["shared"].items():
        assert model.generate(ids, kv_sharing=rule, **common).tolist() == sequences, rule
    exit_loops = torch.tensor(remote["adaptive_exit_loops"])
    assert exit_loops.min() < model.config.num_loops  # the threshold between the extremes does exit early
