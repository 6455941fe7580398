"""``radtrain`` command line: one entry point, one subcommand per job.

``main(argv)`` is callable from tests; ``accelerate launch -m radtrain <subcommand>`` runs the
same code on several processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator

from radtrain.config import ConfigError, load_config, parse_override, valid_keys

log = logging.getLogger("radtrain")

# Exit statuses a script (sbatch, submitit, CI) can act on.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PUSH_FAILED = 3  # training succeeded, publishing did not
# EXIT_RESUME (75) lives in radtrain.trainer: stopped on a signal, checkpoint saved, start again.

OVERRIDES_HELP = "dotted overrides, e.g. train.lr=3e-5 data.source=path/to/dir (keys: see --list-keys)"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch size, an iteration bound)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def probability(text: str) -> float:
    """argparse type: a decision threshold, a probability in [0, 1] (0 emits every label)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (sections data, model, train, hub, tracking)")
    parser.add_argument("--output-dir", help="shortcut for output_dir=...")
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def _config(args: argparse.Namespace):
    overrides = list(args.overrides)
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from radtrain.phase import run_phase

    run_phase(_config(args), args.command)
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from radtrain.evaluate import evaluate_model

    evaluate_model(args.model, args.data, args.split, args.output, args.overrides, threshold=args.threshold)
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    import itertools

    from radtrain.predict import export_text_column, predict_lines, read_texts

    for number, text in enumerate(args.texts, start=1):
        try:
            text.encode("utf-8")  # Python keeps undecodable argument bytes as surrogates
        except UnicodeEncodeError:
            raise ConfigError(
                f"predict: text argument {number} is not UTF-8 ({text.encode('utf-8', 'surrogateescape')[:40]!r}); "
                "convert it (e.g. `iconv -f latin1 -t utf-8`) or pass the texts in a UTF-8 --input file"
            ) from None
    texts: Iterator[str] = iter(args.texts)
    if args.input:
        column = args.text_column or export_text_column(args.model)
        texts = itertools.chain(texts, read_texts(args.input, column, args.input_format))
    first = next(texts, None)
    if first is None and args.input:
        raise ConfigError(f"predict: --input {args.input} holds no texts")
    if first is None:
        raise ConfigError("predict: give texts as arguments or --input FILE (.jsonl/.csv/... with the model's text "
                          "column, 'text' or 'caption'; .txt, one text per line; - for standard input)")
    # Streamed: one line per text as its chunk is scored, whatever the input's size.
    try:
        for line in predict_lines(args.model, itertools.chain([first], texts), threshold=args.threshold,
                                  batch_size=args.batch_size, precision=args.precision):
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:  # `radtrain predict ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from radtrain.demo import run_demo

    if any(parse_override(o)[0] == "output_dir" for o in args.overrides):
        raise ConfigError("radtrain demo: give the directory as --output-dir DIR (its mlm/ and classify/ runs go "
                          "inside it); an output_dir= override would send both phases into one directory")
    run_demo(args.output_dir, args.overrides)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radtrain",
        description="Train ModernBERT radiology CUI classifiers: MLM adaptation, then multi-label fine-tuning.",
    )
    parser.add_argument("--list-keys", action="store_true", help="print every config key and exit")
    sub = parser.add_subparsers(dest="command")

    demo = sub.add_parser("demo", help="offline demo: synthetic captions, scratch tiny model, MLM then classifier")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + " (applied to both phases)")
    demo.set_defaults(func=cmd_demo)

    for name, text in (
        ("mlm", "phase 1: adapt ModernBERT to radiology text with masked-language modelling"),
        ("classify", "phase 2: fine-tune a multi-label CUI classifier (model.init_from=RUN/best to start from MLM)"),
    ):
        p = sub.add_parser(name, help=text)
        _add_config_args(p)
        p.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="metrics of an exported model on a split")
    ev.add_argument("--model", required=True, help="an export directory (a run's best/)")
    ev.add_argument(
        "--data",
        help="data source (default: the one the model was trained on, cut into the run's splits); "
        "any other single file is a held-out set: every caption of it is scored",
    )
    ev.add_argument(
        "--split", choices=("train", "validation", "test"),
        help="which of the run's splits to score (default test); not for a --data file other than the run's own, "
        "which is scored whole",
    )
    ev.add_argument("--output", help="write the metrics as JSON here")
    ev.add_argument("--threshold", type=probability, help="override the export's decision thresholds")
    ev.add_argument("overrides", nargs="*", help="data.* overrides (e.g. data.text_column=text)")
    ev.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="predict CUIs for texts; one JSON object per text")
    pr.add_argument("--model", required=True, help="an export directory (a run's best/)")
    pr.add_argument("--threshold", type=probability, help="override the export's decision thresholds")
    pr.add_argument(
        "--input",
        help=".jsonl/.json/.csv/.tsv/.parquet (the text column, else 'text'), .txt (one text per line, blank ones "
        "included), or - for standard input (one text per line; --input-format jsonl for JSON lines)",
    )
    pr.add_argument(
        "--input-format", choices=("auto", "text", "jsonl"), default="auto",
        help="auto: by the file's suffix, plain text for -; text: one text per line; jsonl: one JSON object per line",
    )
    pr.add_argument("--text-column", help="the --input field holding the text (default: the one the model was trained on)")
    pr.add_argument("--batch-size", type=positive_int, default=32)
    pr.add_argument(
        "--precision", choices=("fp32", "bf16"),
        help="default: the precision the run evaluated in and tuned its thresholds on (its radtrain.json); "
        "fp32 is faster on a CPU without native bf16, at the cost of small differences near a threshold",
    )
    pr.add_argument("texts", nargs="*")
    pr.set_defaults(func=cmd_predict)

    for register in EXTRA_COMMANDS:
        register(sub)
    if UNAVAILABLE_EXTRAS:
        parser.epilog = "unavailable here: " + "; ".join(
            f"{module} (needs {package}: pip install {package})" for module, package in UNAVAILABLE_EXTRAS.items()
        )
    return parser


# Other modules add subcommands here (bench, baseline, submit, push, prefetch) so the CLI stays thin.
EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []
# Extras whose third-party dependency is not installed (module -> missing package): the other
# commands still work (a GPU image without submitit still trains and benchmarks).
UNAVAILABLE_EXTRAS: dict[str, str] = {}


def _register_extras() -> None:
    import importlib

    for module in ("radtrain.bench", "radtrain.baseline", "radtrain.cluster", "radtrain.hub"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            missing = (exc.name or "").split(".")[0]
            if not missing or missing == "radtrain":
                raise  # a broken radtrain install is a bug to see, not an extra to skip
            UNAVAILABLE_EXTRAS[module] = missing
            continue
        register = getattr(mod, "register_cli", None)
        if register is not None and register not in EXTRA_COMMANDS:
            EXTRA_COMMANDS.append(register)


def main(argv: list[str] | None = None) -> int:
    _register_extras()
    parser = build_parser()
    # Overrides (and predict's texts) may also come after options: `classify data.source=X
    # --output-dir D model.name=Y`. argparse's intermixed parsing does not support subcommands.
    args, extra = parser.parse_known_args(argv)
    if extra:
        target = getattr(args, "overrides", getattr(args, "texts", None))
        if target is None or any(token.startswith("-") for token in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        target.extend(extra)
    if args.list_keys:
        print("\n".join(valid_keys()))
        return EXIT_OK
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from radtrain.checkpoint import CheckpointError
    from radtrain.data.sources import DataError
    from radtrain.hub import PushError
    from radtrain.trainer import EXIT_RESUME, NonFiniteLossError, OutOfMemoryError, ResumeRequested

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"radtrain: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ResumeRequested as exc:
        print(f"radtrain: {exc}; run the same command again to resume", file=sys.stderr)
        return EXIT_RESUME
    except (NonFiniteLossError, OutOfMemoryError) as exc:
        print(f"radtrain: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except PushError as exc:
        print(f"radtrain: error: {exc}", file=sys.stderr)
        return EXIT_PUSH_FAILED


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
