"""Our code raises no `FutureWarning` or `DeprecationWarning` on the installed transformers, and uses no name that
transformers logs as deprecated (e.g. `past_key_values` after the 5.24 rename).

transformers logs some deprecations once per process, so the paths run in a fresh child process with
`conftest.STRICT_DEPRECATIONS`: forward with and without a cache, generate (dynamic and static cache, beam search,
sampling), static and adaptive exit, self-speculation (one row, and batched through `generate`), loop and router
logits, a training step with the router losses under activation checkpointing, and save/load. The remote-code copy of
the model runs under the same checks in `test_remote_code_generation.py` and `test_save_load.py`.
"""

from __future__ import annotations

import json

from conftest import run_child, small_config


SCRIPT = r'''
import json

import torch
from transformers import AutoModelForCausalLM

from modeling_looped_moe import LoopedMoeConfig, LoopedMoeForCausalLM
from modeling_looped_moe.compat_looped_moe import output_cache

torch.manual_seed(0)
config = LoopedMoeConfig(**json.loads(sys.argv[2]))
model = LoopedMoeForCausalLM(config).eval()
ids = torch.randint(3, 96, (2, 6))
mask = torch.ones_like(ids)
mask[1, :2] = 0
common = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
with torch.no_grad():
    out = model(ids, attention_mask=mask, use_cache=True, output_loop_logits=True, output_router_logits=True)
    model(ids[:, -1:], attention_mask=torch.ones(2, 7, dtype=torch.long), cache=output_cache(out))
model.generate(ids, **common)
model.generate(ids, cache_implementation="static", **common)
model.generate(ids, num_beams=2, **common)
model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=5)
model.generate(ids, exit_loop=1, **common)
model.generate(ids, exit_criterion="entropy", exit_threshold=4.0, return_dict_in_generate=True, **common)
model.generate_self_speculative(ids[:1], draft_loops=1, num_draft_tokens=2, max_new_tokens=4)
model.generate_self_speculative(ids, attention_mask=mask, draft_loops=1, num_draft_tokens=2, max_new_tokens=4)
model.generate(ids, assistant_early_exit=1, return_dict_in_generate=True, **common)

model.train()
model.activation_checkpointing_enable()
model(ids, attention_mask=mask, labels=ids).loss.backward()
model.eval()

model.save_pretrained(sys.argv[1])
AutoModelForCausalLM.from_pretrained(sys.argv[1]).generate(ids, **common)
print("no deprecations")
'''


def test_no_deprecations_from_our_code(tmp_path):
    """Every main path of the package runs with our deprecation warnings as errors and no deprecation logged."""
    config = small_config(loop_conditioning="iter_adaln", expert_tying_group_size=2, num_untied_first_layers=1,
                          num_untied_last_layers=1)
    fields = {key: value for key, value in config.to_diff_dict().items() if key not in ("model_type", "auto_map")}
    done = run_child(SCRIPT, [tmp_path / "checkpoint", json.dumps(fields)], tmp_path, hide_package=False)
    assert "no deprecations" in done.stdout
