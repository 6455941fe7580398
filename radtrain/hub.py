"""Publishing a ``best/`` export to the Hugging Face Hub, and prefetching what offline jobs need.

``publish()`` makes ONE commit: weights (safetensors), ``config.json`` (CUIs as ``id2label``,
multi-label problem type), tokenizer, ``labels.json``, ``thresholds.json``, ``radtrain.json`` and
a generated ``README.md`` model card. The card is built in memory and every other file is read in
place, so a failed push leaves ``best/`` and the run directory exactly as they were. Callers: the
classifier phase (main process only, when ``hub.repo_id`` is set), ``radtrain push RUN_DIR``
(e.g. from a login node with internet) and the SLURM selection job (:mod:`radtrain.cluster`).

The token is whatever huggingface_hub finds itself (``HF_TOKEN`` or the ``hf auth login`` file):
this module never reads it into a variable that is logged, saved or put in the card; it only
checks that no file it publishes contains it.

``radtrain prefetch`` fills the Hugging Face caches (models through ``snapshot_download``,
datasets through the very ``load_splits`` call a job makes) on a machine with internet, so jobs
on compute nodes can run with ``HF_HUB_OFFLINE=1``; there, a model or dataset that is not cached
fails at start with an error naming it.

Test hook: with ``RADTRAIN_HUB_RECORDER=/path/calls.jsonl`` set, :func:`make_api` returns a
:class:`RecordingApi` instead of ``HfApi``: every Hub call is appended to that file (with the
process's RANK) and committed files are copied under ``/path/calls.jsonl.files/<n>/``. Nothing
is sent anywhere. The Hub is unreachable from CI; this replaces only the client boundary.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from radtrain.config import ConfigError, check_repo_id, check_revision
from radtrain.io import read_json

log = logging.getLogger(__name__)

RECORDER_ENV = "RADTRAIN_HUB_RECORDER"
MAX_TRIES = 4
FIRST_DELAY_S = 2.0  # then 4 s, 8 s: ~14 s of waiting before giving up on a transient failure
README = "README.md"
REQUIRED_FILES = ("config.json", "labels.json", "thresholds.json", "radtrain.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Written by radtrain itself next to an export, never part of a model repository.
SKIP_SUFFIXES = (".tmp", ".old", ".lock")


class PushError(RuntimeError):
    """Publishing failed at the Hub (network, auth, server); the training results on disk are
    intact. ``radtrain`` exits with 3. Problems found locally before any network call (no such
    directory, incomplete or MLM export, bad repo id, a token in the files) are ConfigError (exit 2):
    retrying the push cannot fix them."""


# --------------------------------------------------------------------------- inputs


def resolve_dirs(path: str | Path) -> tuple[Path, Path | None]:
    """(model_dir, run_dir) from a run directory (with best/) or an export directory itself."""
    path = Path(path).expanduser()
    if (path / "best" / "config.json").is_file():
        return path / "best", path
    if (path / "config.json").is_file():
        run_dir = path.parent if (path.parent / "summary.json").is_file() else None
        return path, run_dir
    if path.is_dir():
        raise ConfigError(
            f"{path}: neither a run directory with best/ nor an export (no config.json); "
            "pass a finished run's directory or its best/"
        )
    raise ConfigError(f"{path}: no such directory")


def export_files(model_dir: Path) -> list[Path]:
    """The files of a classifier export to publish, after checking it is complete and coherent."""
    meta = read_json(model_dir / "radtrain.json") if (model_dir / "radtrain.json").is_file() else {}
    missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer.json")
    if missing and meta.get("task", "classify") == "classify":
        raise ConfigError(f"{model_dir}: incomplete export, missing {missing}; was the run finished?")
    if meta.get("task") != "classify":
        raise ConfigError(
            f"{model_dir}: radtrain.json says task {meta.get('task')!r}; publishing covers classifier "
            "exports (a classify run's best/)"
        )
    files = sorted(
        p
        for p in model_dir.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and not p.name.endswith(SKIP_SUFFIXES)
        and p.name != README
    )
    if not any(p.suffix == ".safetensors" for p in files):
        raise ConfigError(f"{model_dir}: no .safetensors weights; re-export with safe_serialization")
    config = read_json(model_dir / "config.json")
    cuis = [row["cui"] for row in read_json(model_dir / "labels.json").get("labels", [])]
    id2label = config.get("id2label") or {}
    ordered = [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))]
    if config.get("problem_type") != "multi_label_classification" or ordered != cuis:
        raise ConfigError(
            f"{model_dir}: config.json does not match labels.json (problem_type "
            f"{config.get('problem_type')!r}, {len(ordered)} vs {len(cuis)} labels); not a radtrain export?"
        )
    return files


def headline(summary: dict[str, Any] | None) -> str:
    """'test f1=0.5123, f1_macro=0.1034, f1_samples=0.4810' (validation when there is no test), plus
    the same under the export's tuned decision rule when the run reports ``*_tuned`` metrics."""
    from radtrain.model_card import HEADLINE_METRICS

    summary = summary or {}
    split = "test" if summary.get("test") else "validation"
    metrics = summary.get(split) or {}

    def show(suffix: str) -> str:
        return ", ".join(
            f"{k}={metrics[k + suffix]:.4f}"
            for k in HEADLINE_METRICS
            if isinstance(metrics.get(k + suffix), (int, float))
        )

    shown, tuned = show(""), show("_tuned")
    text = f"{split} {shown}" if shown else ""
    return f"{text}; tuned thresholds {tuned}" if tuned else text


def commit_message(summary: dict[str, Any] | None, meta: dict[str, Any], user: str | None = None) -> str:
    title = user or f"radtrain classifier, step {meta.get('step')}"
    metrics = headline(summary)
    return f"{title} ({metrics})" if metrics else title


def _known_tokens() -> list[str]:
    """Token values to keep out of published files (never logged; compared only)."""
    values = [os.environ.get(name) for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import get_token

        values.append(get_token())
    except Exception:  # noqa: BLE001 - no login file is fine
        pass
    return [v for v in values if v and len(v) >= 8]


def _check_no_token(files: list[Path], texts: dict[str, str]) -> None:
    tokens = [t.encode() for t in _known_tokens()]
    if not tokens:
        return
    for path in files:
        if path.suffix != ".safetensors" and any(t in path.read_bytes() for t in tokens):
            raise ConfigError(f"{path} contains a Hugging Face token; refusing to publish it")
    for name, text in texts.items():
        if any(t in text.encode() for t in tokens):
            raise ConfigError(f"the {name} would contain a Hugging Face token; refusing to publish it")


# --------------------------------------------------------------------------- the Hub client


def make_api():
    """The one place a Hub client is made: HfApi, or the recorder when RADTRAIN_HUB_RECORDER is set."""
    recorder = os.environ.get(RECORDER_ENV)
    if recorder:
        return RecordingApi(recorder)
    from huggingface_hub import HfApi

    _bound_http_waits()
    return HfApi()  # token: HF_TOKEN or the login file, resolved by huggingface_hub per request


TIMEOUT_ENV = "RADTRAIN_HUB_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 120.0


def hub_timeout_s() -> float:
    """$RADTRAIN_HUB_TIMEOUT_S, checked: a positive, finite number of seconds."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds (default {DEFAULT_TIMEOUT_S:g})")
    return seconds


def _bound_http_waits() -> None:
    """huggingface_hub's HTTP client waits forever by default (``timeout=None``): a proxy or
    firewall that accepts the connection and never answers would hang the push, and the run's end,
    with nothing printed. Give every connect/read/write a bound (``RADTRAIN_HUB_TIMEOUT_S``,
    default 120 s per operation, not per upload); a timeout is a transient failure and is retried."""
    import huggingface_hub

    if not hasattr(huggingface_hub, "set_client_factory"):  # requests-based versions (< 1.0)
        return
    from huggingface_hub.utils import _http

    seconds = hub_timeout_s()
    default = getattr(_http, "default_client_factory", None)
    if default is None or getattr(_bound_http_waits, "seconds", None) == seconds:
        return

    def factory():
        client = default()
        client.timeout = seconds  # the client's own Timeout type: connect, read, write and pool
        return client

    huggingface_hub.set_client_factory(factory)
    _bound_http_waits.seconds = seconds  # type: ignore[attr-defined]


class RecordingApi:
    """Test double for the HfApi boundary (see the module docstring). Only the calls publish makes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _record(self, call: str, **fields: Any) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        number = sum(1 for _ in self.path.open()) if self.path.is_file() else 0
        row = {"call": call, "pid": os.getpid(), "rank": os.environ.get("RANK"), **fields}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        return number

    def create_repo(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        repo_type: str | None = None,
        exist_ok: bool = False,
        **_: Any,
    ) -> str:
        self._record("create_repo", repo_id=repo_id, private=private, repo_type=repo_type, exist_ok=exist_ok)
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id: str, *, branch: str, exist_ok: bool = False, **_: Any) -> None:
        self._record("create_branch", repo_id=repo_id, branch=branch, exist_ok=exist_ok)

    def create_commit(
        self, repo_id: str, operations, *, commit_message: str, revision: str | None = None, **_: Any
    ):
        files = []
        digest = hashlib.sha1()
        staged: list[tuple[str, bytes]] = []
        for op in operations:
            with op.as_file() as handle:
                data = handle.read()
            staged.append((op.path_in_repo, data))
            files.append(
                {"path": op.path_in_repo, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
            digest.update(data)
        number = self._record(
            "create_commit", repo_id=repo_id, revision=revision, commit_message=commit_message, files=files
        )
        out = Path(f"{self.path}.files") / str(number)
        for name, data in staged:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
        oid = digest.hexdigest()
        return _Commit(f"https://huggingface.co/{repo_id}/commit/{oid}", oid)


class _Commit(str):
    """Shaped like huggingface_hub's CommitInfo (a str that is the commit url)."""

    def __new__(cls, url: str, oid: str):
        obj = super().__new__(cls, url)
        obj.commit_url, obj.oid = url, oid
        return obj


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests.exceptions", ("ConnectionError", "Timeout")),
    ):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(errors)


def failure_kind(exc: BaseException) -> str:
    """'offline' | 'auth' | 'transient' (worth retrying) | 'fatal'.

    A refused token (401/403) or a missing repo (404) is not retried: the same request gets the
    same answer, so waiting only delays the message that says what to fix.
    """
    from huggingface_hub import errors

    if isinstance(exc, errors.OfflineModeIsEnabled):
        return "offline"
    if isinstance(exc, getattr(errors, "LocalTokenNotFoundError", ())):
        return "auth"
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return "auth"
        if status is None or status >= 500 or status in (408, 429):
            return "transient"
        return "fatal"
    if isinstance(exc, _network_errors()):
        return "transient"
    return "fatal"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}"


def _with_retries(
    what: str, call: Callable[[], Any], tries: int, first_delay_s: float, retry_hint: str
) -> Any:
    delay = first_delay_s
    for attempt in range(1, tries + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised as PushError
            kind = failure_kind(exc)
            if kind == "transient" and attempt < tries:
                log.warning(
                    "hub: %s failed (%s); retry %d/%d in %.1f s", what, _short(exc), attempt, tries - 1, delay
                )
                time.sleep(delay)
                delay *= 2
                continue
            reason = {
                "offline": "HF_HUB_OFFLINE is set, so nothing can be published from here",
                "auth": "the Hub refused the credentials; set HF_TOKEN to a token with write access "
                "to the namespace, or run `hf auth login`",
                "transient": f"still failing after {tries} tries",
                "fatal": "the Hub refused the request",
            }[kind]
            raise PushError(f"publishing failed at {what}: {reason} ({_short(exc)}). {retry_hint}") from exc
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- publish


def _operations(files: list[Path], generated: dict[str, str]):
    from huggingface_hub import CommitOperationAdd

    ops = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
    ops += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=text.encode("utf-8"))
            for name, text in generated.items()]
    return ops


# Keys of radtrain.json that may hold a local path (which can name a user or a cohort folder).
META_PATH_KEYS = (("base_model",), ("init_from",), ("data", "source"), ("data", "label_names"),
                  ("data", "cache_dir"))


def public_meta(meta: dict[str, Any]) -> str:
    """radtrain.json as published: local paths cut to their last part, as in the card (the file
    in best/ keeps them: evaluate reads the data source from it)."""
    from radtrain.model_card import public_source

    out = json.loads(json.dumps(meta))
    for keys in META_PATH_KEYS:
        section = out
        for key in keys[:-1]:
            section = section.get(key) if isinstance(section.get(key), dict) else {}
        if isinstance(section.get(keys[-1]), str):
            section[keys[-1]] = public_source(section[keys[-1]])
    return json.dumps(out, indent=1) + "\n"


def prepare(
    run_dir_or_model_dir: str | Path,
    repo_id: str,
    revision: str | None = None,
    commit_message_text: str | None = None,
) -> tuple[list[Path], str, str, Path, Path | None]:
    """Everything a push needs, computed locally before any network call:
    (files read in place, generated files {name: text}, commit message, model_dir, run_dir)."""
    from radtrain.model_card import build_card

    check_repo_id(repo_id, "repo id")
    if revision is not None:
        check_revision(revision, "revision")
    model_dir, run_dir = resolve_dirs(run_dir_or_model_dir)
    if run_dir is not None and not (run_dir / "summary.json").is_file():
        raise ConfigError(
            f"{run_dir} has no summary.json: the run has not finished, so its best/ is the best validation "
            "checkpoint so far and was never tested. Finish it (the same command resumes it), or publish the "
            f"export alone, with a card without metrics: radtrain push {model_dir}"
        )
    files = export_files(model_dir)
    meta = read_json(model_dir / "radtrain.json")
    summary = (
        read_json(run_dir / "summary.json") if run_dir and (run_dir / "summary.json").is_file() else None
    )
    if summary and summary.get("best_step") is not None and summary.get("best_step") != meta.get("step"):
        raise ConfigError(
            f"{run_dir}/summary.json describes step {summary.get('best_step')} but best/ is from step "
            f"{meta.get('step')}: the card's metrics would be wrong. Finish the run (or run "
            "`radtrain evaluate`) before publishing"
        )
    try:
        card = build_card(model_dir, run_dir, repo_id, revision)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken export should not crash with a traceback
        raise ConfigError(f"cannot build the model card from {model_dir}: {_short(exc)}") from exc
    message = commit_message(summary, meta, commit_message_text)
    generated = {README: card, "radtrain.json": public_meta(meta)}
    files = [p for p in files if p.name not in generated]
    _check_no_token(files, {"model card": card, "radtrain.json": generated["radtrain.json"],
                            "commit message": message})
    return files, generated, message, model_dir, run_dir


def push_command(
    target: str | Path, repo_id: str, revision: str | None = None, private: bool = True, message: str | None = None
) -> str:
    """The `radtrain push` command line that publishes ``target`` later (shell-quoted)."""
    command = f"radtrain push {shlex.quote(str(target))} --repo-id {shlex.quote(repo_id)}"
    if revision:
        command += f" --revision {shlex.quote(revision)}"
    if not private:
        command += " --public"
    if message:
        command += f" --message {shlex.quote(message)}"
    return command


def publish(
    run_dir_or_model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    revision: str | None = None,
    commit_message: str | None = None,
    api=None,
    tries: int | None = None,
    first_delay_s: float | None = None,
) -> str:
    """Publish a classifier export as one commit to ``repo_id`` (created private unless told
    otherwise; ``private`` only applies when the repo is created) on branch ``revision`` (created
    from main if missing). Returns the commit url. Raises PushError, with nothing local changed."""
    files, generated, message, model_dir, run_dir = prepare(
        run_dir_or_model_dir, repo_id, revision, commit_message
    )
    tries = max(1, tries or MAX_TRIES)
    first_delay_s = FIRST_DELAY_S if first_delay_s is None else first_delay_s
    again = push_command(run_dir or model_dir, repo_id, revision)
    hint = f"Nothing local was changed ({model_dir} is intact); publish later with `{again}`."
    api = api or make_api()
    log.info("hub: publishing %s (%d files) to %s", model_dir, len(files) + len(generated), repo_id)

    def attempt(what: str, call: Callable[[], Any]) -> Any:
        return _with_retries(what, call, tries, first_delay_s, hint)

    attempt(
        f"create_repo {repo_id}",
        lambda: api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True),
    )
    if revision and revision != "main":
        attempt(
            f"create_branch {revision}",
            lambda: api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True),
        )
    info = attempt(
        f"commit to {repo_id}",
        lambda: api.create_commit(
            repo_id, _operations(files, generated), commit_message=message, revision=revision, repo_type="model"
        ),
    )
    url = getattr(info, "commit_url", None) or str(info)
    log.info("hub: published %s (%d files) to %s: %s", model_dir, len(files) + len(generated), repo_id, url)
    return url


def preview(
    run_dir_or_model_dir: str | Path,
    repo_id: str,
    out_dir: str | Path,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Write exactly what publish would commit into ``out_dir`` (no network); returns the message."""
    files, generated, message, model_dir, run_dir = prepare(run_dir_or_model_dir, repo_id, revision, commit_message)
    out = Path(out_dir).expanduser()
    if out.is_file() or (out.exists() and out.resolve() in {p.resolve() for p in (model_dir, run_dir) if p}):
        what = "a file" if out.is_file() else "the export's own directory"
        raise ConfigError(f"--preview {out_dir} is {what}; give a new directory for the commit's files")
    out.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy2(path, out / path.name)
    for name, text in generated.items():
        (out / name).write_text(text, encoding="utf-8")
    return message


def publish_run(run_dir: str | Path, hub_cfg) -> str:
    """The classifier phase's hook (main process, after summary.json): publish run_dir/best.
    Here training has succeeded, so any publishing failure, local checks included, is a PushError
    (exit 3: results kept, push later with `radtrain push`)."""
    try:
        url = publish(
            Path(run_dir) / "best",
            hub_cfg.repo_id,
            private=hub_cfg.private,
            revision=hub_cfg.revision,
            commit_message=hub_cfg.commit_message,
        )
    except ConfigError as exc:
        raise PushError(f"publishing {run_dir}/best was refused: {exc}") from exc
    print(
        f"[radtrain] published best/ to {hub_cfg.repo_id}"
        f"{'@' + hub_cfg.revision if hub_cfg.revision else ''}: {url}",
        flush=True,
    )
    return url


# --------------------------------------------------------------------------- prefetch


def _is_local(source: str) -> bool:
    return source.startswith(("scratch:", ".", "/", "~")) or Path(source).expanduser().exists()


def prefetch_model(model_id: str, trust_remote_code: bool = False) -> str:
    """Download what from_pretrained needs (config, tokenizer, safetensors weights) into the HF
    cache, then load config and tokenizer with local_files_only to prove an offline job can."""
    from huggingface_hub import HfApi, snapshot_download
    from transformers import AutoConfig, AutoTokenizer

    names = HfApi().list_repo_files(model_id)
    patterns = ["*.json", "*.txt", "*.model", "*.safetensors"]
    if not any(n.endswith(".safetensors") for n in names):
        patterns.append("*.bin")  # older repos ship only pytorch_model.bin
    if trust_remote_code:
        patterns.append("*.py")
    path = snapshot_download(model_id, allow_patterns=patterns)
    AutoConfig.from_pretrained(model_id, local_files_only=True, trust_remote_code=trust_remote_code)
    AutoTokenizer.from_pretrained(model_id, local_files_only=True, trust_remote_code=trust_remote_code)
    return path


def prefetch_data(data_cfg) -> dict[str, int]:
    """Run the job's own load_splits once, so the datasets cache holds exactly what it will read."""
    from radtrain.data.sources import load_splits

    # need_labels=False: the same columns are read either way (so the download is the same), and
    # nothing here needs them parsed; a text-only corpus has data.label_column=null.
    return {name: len(split) for name, split in load_splits(data_cfg, need_labels=False).items()}


def prefetch_targets(config: str | None, overrides: list[str]) -> tuple[list[str], list[Any], Any]:
    """What a run config or a job file (jobs/*.yaml) reads from the Hub: model ids, the data
    settings of each source (a dataset is read with its own text/label columns), and the
    RunConfig whose settings the rest uses (a job file's first member). A job file's members are
    planned as `radtrain submit` plans them; a classifier starting from an MLM member of the
    same pipeline has nothing to fetch."""
    from radtrain.cluster.jobfile import load_job
    from radtrain.config import PHASES, load_config, read_yaml_mapping

    # A job file has an mlm: or classify: section; a run config never does.
    if config is not None and set(PHASES) & set(read_yaml_mapping(config, "config file", "sections")):
        pipeline = load_job(config, overrides)
        configs = [member.config for step in pipeline.steps for member in step.members]
        if not configs:
            raise ConfigError(f"job file {config}: no mlm or classify step, nothing to prefetch")
        inside = str(pipeline.root) + "/"
        models = [
            str(m) for c in configs for m in (c.model.init_from, c.model.name) if m and not str(m).startswith(inside)
        ]
        # One config for the options every download shares: remote code is trusted if any run trusts it.
        trust = any(c.model.trust_remote_code for c in configs)
        first = dataclasses.replace(configs[0], model=dataclasses.replace(configs[0].model, trust_remote_code=trust))
        return models, [c.data for c in configs], first
    cfg = load_config(config, overrides)
    return [m for m in (cfg.model.init_from, cfg.model.name) if m], [cfg.data], cfg


def cmd_prefetch(args: argparse.Namespace) -> int:
    from huggingface_hub import constants

    overrides = list(args.overrides)
    config_models, config_data, cfg = prefetch_targets(args.config, overrides)
    models = list(args.model or [])
    # --data ids are read with the config's data settings (columns, label delimiter).
    datasets = [dataclasses.replace(cfg.data, source=source) for source in args.data or []]
    if args.config or (overrides and not models and not datasets):  # what that config needs
        models += config_models
        datasets += config_data
    if not models and not datasets:
        print("radtrain prefetch: give --model ID and/or --data ID (or a job config)", file=sys.stderr)
        return 2
    if constants.HF_HUB_OFFLINE:
        print(
            "radtrain prefetch: HF_HUB_OFFLINE is set here; prefetch where the Hub is reachable "
            "(unset HF_HUB_OFFLINE)",
            file=sys.stderr,
        )
        return 1
    failed = []
    for model_id in dict.fromkeys(models):
        if _is_local(model_id):
            print(f"model {model_id}: local, nothing to fetch")
            continue
        try:
            path = prefetch_model(model_id, cfg.model.trust_remote_code)
            print(f"model {model_id}: cached at {path}")
        except Exception as exc:  # noqa: BLE001 - report every item, then fail
            failed.append(model_id)
            print(f"radtrain prefetch: model {model_id} failed: {_short(exc)}", file=sys.stderr)
    # One read per dataset and columns (a sweep over data.max_length reads the same download).
    for data_cfg in {(d.source, d.text_column, d.label_column): d for d in datasets}.values():
        source = data_cfg.source
        if _is_local(source):
            print(f"data {source}: local, nothing to fetch")
            continue
        try:
            sizes = prefetch_data(data_cfg)
            print(f"data {source}: cached, splits {sizes}")
        except Exception as exc:  # noqa: BLE001
            failed.append(source)
            print(f"radtrain prefetch: data {source} failed: {_short(exc)}", file=sys.stderr)
    if failed:
        print(f"radtrain prefetch: not cached: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"cache: {constants.HF_HOME}; run jobs with HF_HUB_OFFLINE=1 and the same HF_HOME")
    return 0


# --------------------------------------------------------------------------- CLI


def cmd_push(args: argparse.Namespace) -> int:
    saved: dict[str, Any] = {}
    if args.repo_id:
        check_repo_id(args.repo_id, "--repo-id")
    _, run_dir = resolve_dirs(args.run_dir)  # RUN/best reads RUN/config.yaml too
    config_path = run_dir / "config.yaml" if run_dir else None
    if config_path is not None and config_path.is_file():
        from radtrain.config import read_yaml_mapping

        saved = read_yaml_mapping(config_path, "run config", "sections").get("hub") or {}
    repo_id = args.repo_id or saved.get("repo_id")
    if not repo_id:
        raise ConfigError(f"{args.run_dir}: no hub.repo_id in its config.yaml; give --repo-id org/name")
    revision = args.revision or saved.get("revision")
    message = args.message or saved.get("commit_message")
    if args.preview:
        text = preview(args.run_dir, repo_id, args.preview, revision, message)
        print(f"wrote the commit's files to {args.preview}; commit message: {text}")
        return 0
    private = False if args.public else bool(saved.get("private", True))
    url = publish(args.run_dir, repo_id, private=private, revision=revision, commit_message=message)
    print(url)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    push = subparsers.add_parser(
        "push",
        help="publish a finished run's best/ to the Hugging Face Hub (one commit, model card included)",
    )
    push.add_argument("run_dir", help="a run directory (with best/) or an export directory")
    push.add_argument("--repo-id", help="org/name (default: hub.repo_id from the run's config.yaml)")
    push.add_argument("--revision", help="branch to commit to; created if missing (default: main)")
    push.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    push.add_argument("--message", help="commit title (headline test metrics are appended)")
    push.add_argument(
        "--preview", metavar="DIR", help="write the files that would be committed to DIR; no network"
    )
    push.set_defaults(func=cmd_push)

    pre = subparsers.add_parser(
        "prefetch",
        help="download models/datasets into the HF cache (login node) so jobs can run with HF_HUB_OFFLINE=1",
    )
    pre.add_argument("--model", action="append", help="Hub model id (repeatable)")
    pre.add_argument(
        "--data", action="append", help="Hub dataset id (repeatable); read with the data.* settings"
    )
    pre.add_argument(
        "--config",
        "-c",
        help="a run config (radtrain classify --config) or a job file (jobs/*.yaml): prefetch the "
        "model.name, model.init_from and data.source of every run it describes",
    )
    pre.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.text_column=text")
    pre.set_defaults(func=cmd_prefetch)
