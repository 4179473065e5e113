"""Command line: ``lowbit report`` and ``lowbit train`` (console script
``lowbit = lowbit.fast.cli:main``).

``lowbit --version`` prints the installed version.
``lowbit report [--model minilm|smollm2] [--methods formats,llm_int8,fpq] [--calib-size N]
[--eval-size N] [--out DIR] [--quick | --full] [--no-progress]`` quantizes the model every selected
way, prints the comparison table and writes it, as markdown and CSV, with plots, to ``--out``.
``lowbit train [--model NAME] [--steps N] [--epochs N] [--out DIR] [--no-progress]`` runs the
4-bit training experiments at full length (``lowbit.fast.report.int4_training.run_training``).
``lowbit export --model NAME --method rtn|fp8|llm_int8|mxfp4|nvfp4|omniquant --bits N
--group-size N [--asymmetric] --format compressed-tensors|bitsandbytes|gguf --out DIR`` writes
a quantized model folder other engines load (``lowbit.fast.export``).

Bad input (unknown model or method, sizes out of range, a model that is not installed)
gives one line on stderr, ``lowbit: error: ...``, and exit status 2: never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

PROG = "lowbit"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        # argparse prints the whole usage block; the contract is one line, then exit 2.
        raise _UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> _Parser:
    from lowbit.fast import __version__

    parser = _Parser(prog=PROG, description="Low-bit quantization of transformers.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    report = commands.add_parser(
        "report",
        help="quantize a real model every way and compare quality, size and time",
        description="Quantize a real model with every selected method, print the comparison "
        "table and write report.md, report.csv and plots to --out. The default run (MiniLM, "
        "every method) takes under 3 minutes on an idle 2-core machine, --full about 6; the "
        "plan and its expected time are printed first.",
    )
    report.add_argument(
        "--model",
        metavar="NAME",
        default="minilm",
        help="minilm (default, BERT encoder) or smollm2 (LLaMA decoder)",
    )
    report.add_argument(
        "--methods",
        metavar="LIST",
        default=None,
        help="comma-separated methods (default: all registered), e.g. formats,llm_int8,fpq",
    )
    report.add_argument(
        "--calib-size",
        metavar="N",
        type=_positive_int,
        default=None,
        help="calibration passages (default 32; 8 for smollm2)",
    )
    report.add_argument(
        "--eval-size",
        metavar="N",
        type=_positive_int,
        default=None,
        help="evaluation passages (default 64; 16 for smollm2)",
    )
    report.add_argument(
        "--out",
        metavar="DIR",
        default="lowbit-report",
        help="output folder (default lowbit-report)",
    )
    tier = report.add_mutually_exclusive_group()
    tier.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: every section and experiment on tiny settings (4 calibration and 8 "
        "evaluation passages, a minimal search, a few training steps); under a minute on 2 "
        "cores, numbers not meaningful",
    )
    tier.add_argument(
        "--full",
        action="store_true",
        help="every experiment at the longer settings: all five OmniQuant settings with twice "
        "the calibration passages, FPQ's wider search (21 candidates on 256 tokens) and W4A8 "
        "baseline, 100 training steps and the MiniLM fine-tuning; about 6 minutes on 2 cores",
    )
    report.add_argument("--no-progress", action="store_true", help="hide progress bars")
    train = commands.add_parser(
        "train",
        help="train with 4-bit integers (Int4Linear) against full precision",
        description="The 4-bit training experiments of the report at full length: a small LLaMA "
        "language model from scratch with the paper's four recipes (FP32, LSQ only, HQ + bit "
        "split, HQ + LSS) and two of current hardware, emulated (MXFP4, NVFP4), and MiniLM "
        "fine-tuned to name a passage's play (FP32 vs HQ + LSS). Writes training.md, "
        "training.csv and the loss and accuracy plots to --out. About 17 minutes on 2 cores "
        "at the defaults.",
    )
    train.add_argument("--model", metavar="NAME", default="minilm",
                       help="minilm (default) or smollm2: whose tokenizer the LM uses; the "
                       "fine-tuning runs on minilm only")  # fmt: skip
    train.add_argument("--steps", metavar="N", type=_positive_int, default=600,
                       help="language-model training steps per recipe (default 600)")  # fmt: skip
    train.add_argument("--epochs", metavar="N", type=_positive_int, default=5,
                       help="fine-tuning epochs per recipe (default 5)")  # fmt: skip
    train.add_argument("--out", metavar="DIR", default="lowbit-train",
                       help="output folder (default lowbit-train)")  # fmt: skip
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")
    export = commands.add_parser(
        "export",
        help="quantize a model and write it in a format other engines load",
        description="Quantize a real model's linear layers and write what the format's own "
        "loader reads: a model folder (config.json with its quantization_config, tokenizer "
        "files, model.safetensors) in compressed-tensors (vLLM, transformers: rtn, fp8, "
        "llm_int8 as W8A8, mxfp4, nvfp4, omniquant) or bitsandbytes int8 (transformers: "
        "llm_int8), or a folder holding model.gguf (llama.cpp, transformers: rtn as Q4_0 / "
        "Q8_0, mxfp4; LLaMA-family models). The folder appears only once complete.",
    )
    export.add_argument("--model", metavar="NAME", default="minilm",
                        help="minilm (default) or smollm2")  # fmt: skip
    export.add_argument("--method", metavar="NAME", default=None,
                        choices=["rtn", "fp8", "llm_int8", "mxfp4", "nvfp4", "omniquant"],
                        help="rtn (round-to-nearest integers; the default of compressed-tensors "
                        "and gguf), fp8 (E4M3 per output channel), llm_int8 (row-wise int8; "
                        "bitsandbytes' default), mxfp4, nvfp4, or omniquant (LWC calibration "
                        "on 8 Shakespeare passages, then the calibrated weights)")  # fmt: skip
    export.add_argument("--bits", metavar="N", type=int, default=None,
                        help="rtn / omniquant weight bits (default 4; compressed-tensors 2 to "
                        "8; gguf 4 or 8); the other methods have their own")  # fmt: skip
    export.add_argument("--group-size", metavar="N", type=int, default=None,
                        help="rtn / omniquant inputs per scale (default 128, gguf 32; 0: one "
                        "scale per output channel); the other methods have their own")  # fmt: skip
    export.add_argument("--asymmetric", action="store_true",
                        help="rtn with zero points (omniquant always has them; both load with "
                        "CompressedTensorsConfig(dequantize=True): an upstream bug)")  # fmt: skip
    export.add_argument("--format", metavar="NAME", default="compressed-tensors",
                        choices=["compressed-tensors", "bitsandbytes", "gguf"],
                        help="compressed-tensors (default; vLLM, transformers), bitsandbytes "
                        "(transformers' int8 checkpoints) or gguf (llama.cpp)")  # fmt: skip
    export.add_argument("--out", metavar="DIR", required=True, help="output folder (new or empty)")
    export.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _export(args: argparse.Namespace) -> int:
    import torch

    from lowbit.fast import export, models

    if args.model not in ("minilm", "smollm2"):
        raise ValueError(f"unknown model {args.model!r}; choose one of minilm, smollm2")
    method = args.method or export.METHODS.get(args.format, ("rtn",))[0]
    if args.group_size is not None and args.group_size < 0:
        raise ValueError(f"--group-size must be >= 0 (0: per channel), got {args.group_size}")
    group_size = export.AUTO if args.group_size is None else (args.group_size or None)
    symmetric = not args.asymmetric
    calibrating = method == "omniquant"
    if calibrating:  # --bits / --group-size set the calibration; the export takes the modules'
        export.check_options(args.format, method)  # the format holds it
        bits = 4 if args.bits is None else args.bits
        if not 2 <= bits <= 8:
            raise ValueError(
                f"omniquant calibrates 2- to 8-bit weights, not {bits}: pass --bits 2-8"
            )
        group_size = 128 if group_size == export.AUTO else group_size
        assert not isinstance(group_size, str)
        symmetric = False  # OmniQuant's quantizer, as in the paper: zero points
    else:
        bits, group_size = export.check_options(
            args.format, method, args.bits, group_size, symmetric
        )
    if args.format == "gguf" and args.model != "smollm2":
        raise ValueError(
            f"GGUF export writes LLaMA-architecture models and {args.model} is not one: pass "
            "--model smollm2, or --format compressed-tensors"
        )
    out = export.check_out_dir(args.out)  # all before loading anything
    # MiniLM with its pooler: the folder must hold every weight BertModel has on reload
    net, tokenizer = (
        models.load_minilm(keep_pooler=True) if args.model == "minilm" else models.load_smollm2()
    )
    if calibrating:
        for name, m in models.transformer_blocks(net).named_modules():
            if isinstance(m, torch.nn.Linear) and group_size and m.in_features % group_size:
                raise ValueError(
                    f"group size {group_size} does not divide the {m.in_features} inputs of "
                    f"{name!r}, and compressed-tensors has no shorter last group: pass a divisor "
                    "(--group-size 64, 128) or 0 (per channel)"
                )
        _calibrate_omniquant(net, tokenizer, bits, group_size, progress=not args.no_progress)
    with warnings.catch_warnings():  # the summary below says what the format leaves out
        warnings.filterwarnings("ignore", "compressed-tensors int-quantized", UserWarning)
        export.export(
            net, out, args.format, method=method,
            bits=export.AUTO if calibrating else bits,
            group_size=export.AUTO if calibrating else group_size,
            symmetric=symmetric or calibrating, tokenizer=tokenizer, progress=not args.no_progress,
        )  # fmt: skip
    print(
        f"wrote {out}: {args.format}, {method} {_scheme(method, args.format, bits, group_size, symmetric)}"
    )
    return 0


def _scheme(method: str, format: str, bits, group_size, symmetric: bool) -> str:
    """What the export holds, in the usual W/A notation."""
    if method == "llm_int8":
        if format == "bitsandbytes":
            return "W8A8 (row-wise int8 weights, LLM.int8() with its threshold at run time)"
        return (
            "W8A8 (row-wise int8 weights; activations per token by the loader: LLM.int8()'s "
            "outlier decomposition has no representation in the format and is left out)"
        )
    if method in ("mxfp4", "nvfp4"):
        return f"W4A16 ({method.upper()} weights)"
    if method == "fp8":
        return "W8A16 per channel (E4M3 weights)"
    scheme = f"W{bits}A16 {f'g{group_size}' if group_size else 'per channel'}"
    if method == "omniquant":
        return scheme + " (LWC, zero points)"
    if format == "gguf":
        return scheme + f" (GGUF Q{bits}_0, float16 scales)"
    return scheme + ("" if symmetric else " asymmetric")


def _calibrate_omniquant(net, tokenizer, bits: int, group_size, progress: bool) -> None:
    """LWC calibration of ``net`` in place, asymmetric, with the report's default settings (8
    Shakespeare passages, 3 epochs): what ``lowbit export --method omniquant`` writes."""
    from lowbit.fast import data
    from lowbit.fast.nn.omniquant import calibrate
    from lowbit.fast.report.omniquant import OMNIQUANT_CALIB as settings

    texts = data.load_texts("calib", settings["passages"])
    size = settings["batch_size"]
    batches = [
        dict(tokenizer(texts[i : i + size], padding=True, truncation=True, max_length=128,
                       return_tensors="pt"))
        for i in range(0, len(texts), size)
    ]  # fmt: skip
    calibrate(net, batches, wbits=bits, group_size=group_size, symmetric=False, lwc=True,
              epochs=settings["epochs"], lwc_lr=settings["lwc_lr"], progress=progress)  # fmt: skip


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}".replace("\n", " "), file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input)."""
    try:
        args = _parser().parse_args(argv)
    except _UsageError as err:
        return _fail(str(err))
    except SystemExit as done:  # --help and --version print, then argparse exits
        return int(done.code or 0)

    from lowbit.fast import report  # torch and transformers load only for real work
    from lowbit.fast.models import ModelNotInstalled

    try:
        if args.command == "train":
            from lowbit.fast.report.int4_training import run_training

            if args.model not in report.MODELS:
                raise ValueError(
                    f"unknown model {args.model!r}; choose one of {', '.join(report.MODELS)}"
                )
            run_training(args.model, args.out, lm_steps=args.steps, epochs=args.epochs,
                         progress=not args.no_progress)  # fmt: skip
            print(f"wrote {args.out}/training.md, training.csv and the plots")
            return 0
        if args.command == "export":
            return _export(args)
        report.run_report(
            model=args.model,
            methods=args.methods,
            calib_size=args.calib_size,
            eval_size=args.eval_size,
            out_dir=args.out,
            progress=not args.no_progress,
            quick=args.quick,
            full=args.full,
        )
    except (ValueError, ModelNotInstalled) as err:
        return _fail(str(err))
    except OSError as err:  # e.g. the disk filled up while writing the report
        return _fail(f"{err.strerror or err} ({err.filename or args.out})")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing half-written was left in {args.out}", file=sys.stderr)
        return 130
    print(f"wrote {args.out}/report.md, report.csv and the plots")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
