"""Safety (issue 3, point 5): one-line errors, a non-zero exit and no partial output, for every family.

Each broken source is a copy of a sharded per-expert checkpoint with one defect. The command must print exactly one
`error: ...` line on stderr, return 2, and leave neither the output folder nor a temporary folder beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAMILIES, family_model, leftovers, load_cli, save_source



EXPERT_WIDTH_FIELD = {"mixtral": "intermediate_size", "olmoe": "intermediate_size",
                      "qwen2_moe": "moe_intermediate_size", "qwen3_moe": "moe_intermediate_size"}


@pytest.fixture(scope="module")
def cli():
    """The command's module."""
    return load_cli()


@pytest.fixture(scope="module")
def pristine_sources(tmp_path_factory) -> dict[str, Path]:
    """One sharded per-expert source per family (6 layers), saved once per module."""
    root = tmp_path_factory.mktemp("sources")
    return {family: save_source(family_model(family, 6), root / family, sharded=True) for family in FAMILIES}


def broken_copy(pristine_sources: dict[str, Path], family: str, tmp_path: Path) -> Path:
    """A private copy of the family's source that a test may damage."""
    return Path(shutil.copytree(pristine_sources[family], tmp_path / "source"))


def shard_names(source: Path) -> list[str]:
    """Shard file names from the source index."""
    index = json.loads((source / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def run_failing(cli, capsys, source: Path, output: Path, *extra: str) -> str:
    """Runs the command expecting failure; checks the exit status, the one-line message and that nothing is left."""
    status = cli.main(["--source", str(source), "--output", str(output), "--no-progress", *extra])
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert not output.exists()
    assert leftovers(output.parent, output.name) == []
    return lines[0]


def test_unsupported_model_type_lists_supported(cli, capsys, pristine_sources, tmp_path: Path):
    """An unsupported model_type names the supported ones."""
    source = broken_copy(pristine_sources, "mixtral", tmp_path)
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "llama"
    (source / "config.json").write_text(json.dumps(config))
    message = run_failing(cli, capsys, source, tmp_path / "out")
    assert "unsupported model_type 'llama'" in message
    assert all(family in message for family in FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_shard(family, cli, capsys, pristine_sources, tmp_path: Path):
    """A shard named by the index but absent."""
    source = broken_copy(pristine_sources, family, tmp_path)
    shards = shard_names(source)
    assert len(shards) > 1
    (source / shards[1]).unlink()
    assert f"missing shard {source / shards[1]}" in run_failing(cli, capsys, source, tmp_path / "out")


@pytest.mark.parametrize("family", FAMILIES)
def test_truncated_shard(family, cli, capsys, pristine_sources, tmp_path: Path):
    """A shard cut short."""
    source = broken_copy(pristine_sources, family, tmp_path)
    shard = source / shard_names(source)[-1]
    os.truncate(shard, shard.stat().st_size - 100)
    assert "corrupt or truncated safetensors file" in run_failing(cli, capsys, source, tmp_path / "out")


@pytest.mark.parametrize("family", FAMILIES)
def test_corrupt_shard_header(family, cli, capsys, pristine_sources, tmp_path: Path):
    """A shard whose JSON header is garbage."""
    source = broken_copy(pristine_sources, family, tmp_path)
    shard = source / shard_names(source)[0]
    data = bytearray(shard.read_bytes())
    data[8:40] = b"#" * 32
    shard.write_bytes(bytes(data))
    message = run_failing(cli, capsys, source, tmp_path / "out")
    assert "corrupt or truncated safetensors file" in message and shard.name in message


@pytest.mark.parametrize("family", FAMILIES)
def test_index_names_absent_tensor(family, cli, capsys, pristine_sources, tmp_path: Path):
    """An index entry pointing at a shard that does not hold the tensor."""
    source = broken_copy(pristine_sources, family, tmp_path)
    index_path = source / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = shard_names(source)
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    message = run_failing(cli, capsys, source, tmp_path / "out")
    assert f"names tensor {name} in {shards[1]}, which does not hold it" in message


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_contradict_config(family, cli, capsys, pristine_sources, tmp_path: Path):
    """config.json says experts are wider than the stored tensors."""
    source = broken_copy(pristine_sources, family, tmp_path)
    config = json.loads((source / "config.json").read_text())
    config[EXPERT_WIDTH_FIELD[family]] += 8
    (source / "config.json").write_text(json.dumps(config))
    message = run_failing(cli, capsys, source, tmp_path / "out")
    assert "has shape" in message and "but config.json implies" in message


@pytest.mark.parametrize("family", FAMILIES)
def test_group_size_that_does_not_fit(family, cli, capsys, pristine_sources, tmp_path: Path):
    """Groups of 3 cannot split the MoE layers between the anchors."""
    message = run_failing(cli, capsys, pristine_sources[family], tmp_path / "out", "--tie-group-size", "3",
                          "--num-untied-first-layers", "1")
    assert message.startswith("error: tying does not fit: group size 3")


@pytest.mark.parametrize("family", FAMILIES)
def test_existing_output_needs_overwrite(family, cli, capsys, pristine_sources, tmp_path: Path):
    """An existing output is refused (and left untouched) without --overwrite and replaced with it."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    status = cli.main(["--source", str(pristine_sources[family]), "--output", str(output), "--no-progress",
                       "--calibration-tokens", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "already exists (use --overwrite" in err[0]
    assert (output / "keep.txt").read_text() == "mine"
    status = cli.main(["--source", str(pristine_sources[family]), "--output", str(output), "--no-progress",
                       "--calibration-tokens", "0", "--overwrite"])
    assert status == 0
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_interrupted_run_leaves_nothing(family, interruption, cli, capsys, pristine_sources, tmp_path: Path,
                                        monkeypatch):
    """A failure half way through the layers (after shards were started) removes the temporary folder."""
    from modeling_looped_moe.conversion import pipeline as conversion_pipeline

    original = conversion_pipeline._Runner._layer
    seen = []

    def failing_layer(self, layer_idx):
        if layer_idx == 3:
            seen.append(leftovers(tmp_path, "out"))
            raise interruption("simulated failure")
        return original(self, layer_idx)

    monkeypatch.setattr(conversion_pipeline._Runner, "_layer", failing_layer)
    output = tmp_path / "out"
    if interruption is KeyboardInterrupt:
        status = cli.main(["--source", str(pristine_sources[family]), "--output", str(output), "--no-progress"])
        assert status == 130
        assert "interrupted" in capsys.readouterr().err
    else:
        with pytest.raises(RuntimeError, match="simulated"):
            cli.main(["--source", str(pristine_sources[family]), "--output", str(output), "--no-progress"])
    assert seen and any(name.startswith(".out.tmp-") for name in seen[0])  # the run had really started writing
    assert not output.exists() and leftovers(tmp_path, "out") == []


def test_command_line_exit_status_and_success(pristine_sources, tmp_path: Path):
    """The command runs standalone: a clean one-line error with status 2, then a successful conversion."""
    command = [sys.executable, "-m", "modeling_looped_moe.conversion"]
    env = {**os.environ, "PYTHONPATH": ""}
    failed = subprocess.run([*command, "--source", str(tmp_path / "nowhere"), "--output",
                             str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1] == f"error: source {tmp_path / 'nowhere'} is not a folder"
    assert "Traceback" not in failed.stderr
    done = subprocess.run([*command, "--source", str(pristine_sources["qwen2_moe"]), "--output",
                           str(tmp_path / "out"), "--tie-group-size", "2", "--num-untied-first-layers", "1",
                           "--num-untied-last-layers", "1"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "converting" in done.stderr  # the progress bar over layers
    assert (tmp_path / "out" / "conversion_report.json").is_file()


@pytest.mark.parametrize(("family", "field", "value", "phrase"), [
    ("mixtral", "sliding_window", 16, "sliding_window attention is not supported"),
    ("qwen2_moe", "use_sliding_window", True, "use_sliding_window=true is not supported"),
    ("qwen3_moe", "use_sliding_window", True, "use_sliding_window=true is not supported"),
    ("olmoe", "clip_qkv", 8.0, "clip_qkv is not supported"),
])
def test_features_the_import_cannot_express(family, field, value, phrase, cli, capsys, pristine_sources,
                                            tmp_path: Path):
    """Source settings that would make the import lossy are refused by name rather than silently dropped."""
    source = broken_copy(pristine_sources, family, tmp_path)
    config = json.loads((source / "config.json").read_text())
    config[field] = value
    (source / "config.json").write_text(json.dumps(config))
    assert phrase in run_failing(cli, capsys, source, tmp_path / "out")
