"""Command line: ``python -m lycoris_lite inspect|convert|combine|extract|fuse``.

``inspect`` reads an adapter without a model (:mod:`lycoris_lite.io.inspect`): format, algorithms with
their layer counts, ranks, alphas, module count, the model family (from key names and cross-attention
widths, else from the metadata), the metadata summary (:mod:`lycoris_lite.io.metadata`) and the trigger
words. ``--json`` prints the same as one JSON object. This module holds the argument parsing and the
commands.

``convert`` needs the base model (``--model``: ``tiny-sd``, ``tiny-sdxl``, a diffusers folder or a hub
id) to map module names and to know the base weights. It loads IN onto the model with
``files.load_adapter`` and writes OUT with ``files.save_adapter(format=…)``:

* without ``--rank``: losslessly; when the target format cannot hold the adapter (LoHa/LoKr/OFT/BOFT/HRA
  as a diffusers LoRA, output-side rotations as PEFT, …) it stops with an error that asks for ``--rank``;
* with ``--rank N``: a LoRA of rank ``≤ N`` extracted from each layer's effective weight change
  (:mod:`lycoris_lite.tools.extract`); the relative error of every layer is printed, then the max and mean.

The source's descriptive metadata (kohya's training keys and tag frequencies, ``modelspec.*``, our base
model, trigger words and training settings) is carried over.

``combine`` loads several adapters (``--adapter FILE:WEIGHT``, repeated) onto ``--model`` and writes their
weighted combination (:mod:`lycoris_lite.tools.arithmetic`: ``--type svd|cat|linear|ties|dare_linear|…``) as
one LoRA file. ``extract`` writes the LoRA of a fully fine-tuned model (``--tuned``) against its base
(``--base``) at ``--rank N`` or ``--energy F`` (:func:`lycoris_lite.tools.extract.extract_lora`), printing each
layer's relative error and every other changed tensor a LoRA cannot hold. ``fuse`` (alias ``merge``,
kohya's word) fuses adapters into the model and saves it as a diffusers folder, or one safetensors file
with ``--single-file`` (:mod:`lycoris_lite.tools.fused`).

Exit status: 0 on success, 2 for bad arguments or unusable input; nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..base.dtypes import DTYPES
from ..io import files
from ..io.files import components_of
from ..io.formats.peft_format import WEIGHTS_NAME as PEFT_WEIGHTS
from ..io.inspect import InspectError, carried_metadata, describe, format_report, header_metadata
from ..io.metadata import PREFIX
from ..models import load_pipeline
from ..tools.arithmetic import COMBINATION_TYPES, SIGN_METHODS, combine_adapters
from ..tools.extract import adapter_to_lora, attach_entries, extract_lora
from ..tools.svd import METHODS
from ..tools.fused import fuse_adapter_files, save_fused

FORMATS = files.FORMATS


class CLIError(InspectError):
    """A bad argument or unusable input: reported on stderr, exit status 2 (as an :class:`InspectError`
    from reading an adapter is)."""


def _load_pipe(name: str):
    try:
        return load_pipeline(name)
    except (OSError, ValueError, TypeError) as exc:  # FileNotFoundError is an OSError
        raise CLIError(f"cannot load the model {name!r}: {exc}") from None


def _load_model(name: str):
    return components_of(_load_pipe(name))


def _check_parent(target: Path) -> None:
    """The folders above ``target`` are folders (or can be made): a file on the way is a clear error here,
    not a traceback at the end of the work."""
    for parent in target.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"cannot write {target}: {parent} is a file, not a folder")
            return


def _save(save, target: Path, what: str):
    """``save()``, with an error writing ``target`` (permissions, a full disk) reported as a CLIError; the
    writes are atomic, so nothing partial is left."""
    try:
        return save()
    except OSError as exc:
        raise CLIError(f"cannot write {what} to {target}: {exc}") from None


def _check_output(args) -> Path:
    target = Path(args.output)
    _check_parent(target)
    if args.to == "kohya" and target.is_dir():
        raise CLIError(f"{target} is a folder; the kohya format is one file (give OUT as NAME.safetensors)")
    if args.to == "peft" and target.suffix == ".safetensors":
        raise CLIError(f"the peft format is a folder (adapter_config.json + {PEFT_WEIGHTS}, per component); "
                       f"give OUT as a folder path, not {target.name}")
    if target.resolve() == Path(args.input).resolve():
        raise CLIError("OUT is IN; write the conversion to another path")
    return target


def convert(args, out=sys.stdout) -> int:
    if not Path(args.input).exists():
        raise CLIError(f"{args.input}: no such file or folder")
    target = _check_output(args)
    dtype = DTYPES[args.dtype] if args.dtype else None
    components = _load_model(args.model)
    try:
        info = files.load_adapter(components, args.input, "source", allow_pickle=args.allow_pickle,
                                  strict=not args.skip_unknown)
    except (ValueError, TypeError, OSError) as exc:  # AdapterFileError is a ValueError
        raise CLIError(f"cannot load {args.input} onto {args.model}: {exc}") from None
    print(f"loaded {args.input}: {info.format}, "
          f"{', '.join(f'{a} ({n} layers)' for a, n in info.algorithms.items())}; {info.coverage_line()}", file=out)
    metadata = carried_metadata({**header_metadata(Path(args.input)), **info.metadata})
    metadata[PREFIX + "converted_from"] = json.dumps({"format": info.format, "algorithms": info.algorithms})

    if args.rank is None:
        try:
            written = _save(lambda: files.save_adapter(components, "source", target, format=args.to, dtype=dtype,
                                                       metadata=metadata), target, "the adapter")
        except ValueError as exc:
            raise CLIError(f"the {args.to} format cannot hold this adapter as it is: {exc}\n"
                           "Pass --rank N to write a rank-N LoRA extracted from it (lossy; the error is reported).") from None
        print(f"wrote {written} ({args.to}, lossless, {sum(info.components.values())} layers)", file=out)
        return 0

    print(f"extracting a LoRA of rank ≤ {args.rank} from each layer's effective weight change "
          f"(relative error ‖ΔW − up·down‖_F / ‖ΔW‖_F):", file=out)
    entries, errors = adapter_to_lora(components, "source", args.rank,
                                      lambda c, p, e: print(f"  {c}.{p}: {e:.3e}", file=out))
    values = [e for layer_errors in errors.values() for e in layer_errors.values()]
    worst, mean = max(values), sum(values) / len(values)
    print(f"relative error over {len(values)} layers: max {worst:.3e}, mean {mean:.3e}", file=out)
    attach_entries(components, "lora", entries)
    metadata[PREFIX + "extraction"] = json.dumps({"rank": args.rank, "max_relative_error": worst,
                                                  "mean_relative_error": mean})
    try:
        written = _save(lambda: files.save_adapter(components, "lora", target, format=args.to, dtype=dtype,
                                                   metadata=metadata), target, "the extracted LoRA")
    except ValueError as exc:
        raise CLIError(f"cannot write the extracted LoRA as {args.to}: {exc}") from None
    print(f"wrote {written} ({args.to}, LoRA rank ≤ {args.rank}, {len(values)} layers)", file=out)
    return 0


# ---- combine, extract, fuse ----------------------------------------------------------------------
def _adapter_arg(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:WEIGHT`` (the weight defaults to 1)."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            return text, 1.0
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"the weight of {path} must be a finite number, got {weight!r}")
        return path, value
    return text, 1.0


def _check_adapters(adapters) -> None:
    missing = [p for p, _ in adapters if not Path(p).exists()]
    if missing:
        raise CLIError(f"{missing[0]}: no such file or folder")


def _check_adapter_output(path: str, fmt: str, sources) -> Path:
    target = Path(path)
    _check_parent(target)
    if fmt == "kohya" and target.is_dir():
        raise CLIError(f"{target} is a folder; the kohya format is one file (give --out NAME.safetensors)")
    if fmt == "peft" and target.suffix == ".safetensors":
        raise CLIError(f"the peft format is a folder; give --out as a folder path, not {target.name}")
    if any(target.resolve() == Path(s).resolve() for s in sources):
        raise CLIError("--out is one of the inputs; write to another path")
    return target


def _print_errors(errors: dict[str, dict[str, float]], out, extra=None) -> tuple[float, float]:
    values = []
    for component, layers in errors.items():
        for path, error in layers.items():
            print(f"  {component}.{path}: {error:.3e}" + (f" ({extra(component, path)})" if extra else ""), file=out)
            values.append(error)
    worst, mean = max(values), sum(values) / len(values)
    print(f"relative error over {len(values)} layers: max {worst:.3e}, mean {mean:.3e}", file=out)
    return worst, mean


def combine(args, out=sys.stdout) -> int:
    _check_adapters(args.adapter)
    target = _check_adapter_output(args.out, args.to, [p for p, _ in args.adapter])
    components = _load_model(args.model)
    names = [f"in{i}" for i in range(len(args.adapter))]
    try:
        for name, (path, _) in zip(names, args.adapter):
            info = files.load_adapter(components, path, name, allow_pickle=args.allow_pickle,
                                      strict=not args.skip_unknown, activate=False)
            print(f"loaded {path}: {info.format}, {', '.join(f'{a} ({n} layers)' for a, n in info.algorithms.items())}",
                  file=out)
        result = combine_adapters(components, names, [w for _, w in args.adapter], "combined", args.type,
                                  density=args.density, majority_sign_method=args.majority_sign, svd_rank=args.rank,
                                  svd_clamp=args.clamp, generator=torch.Generator().manual_seed(args.seed))
    except (ValueError, TypeError, OSError) as exc:
        raise CLIError(f"cannot combine: {exc}") from None
    ranks = sorted({r for layers in result.ranks.values() for r in layers.values()})
    layers = sum(len(v) for v in result.ranks.values())
    print(f"combined with {result.combination_type}: a LoRA on {layers} layers, rank "
          f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}", file=out)
    metadata = {PREFIX + "combination": json.dumps({
        "type": result.combination_type, "adapters": [{"source": Path(p).name, "weight": w} for p, w in args.adapter],
        "density": args.density, "majority_sign_method": args.majority_sign, "svd_rank": args.rank, "seed": args.seed})}
    written = _write_adapter(components, "combined", target, args, metadata, "the combination")
    print(f"wrote {written} ({args.to})", file=out)
    return 0


def _write_adapter(components, name: str, target: Path, args, metadata: dict, what: str) -> Path:
    """Save adapter ``name`` to ``target`` in ``args.to`` (and ``args.dtype``); a refusal is a CLIError."""
    try:
        return _save(lambda: files.save_adapter(components, name, target, format=args.to,
                                                dtype=DTYPES[args.dtype] if args.dtype else None,
                                                metadata=metadata), target, what)
    except ValueError as exc:
        raise CLIError(f"cannot write {what} as {args.to}: {exc}") from None


def extract(args, out=sys.stdout) -> int:
    target = _check_adapter_output(args.out, args.to, [])
    base, tuned = _load_model(args.base), _load_model(args.tuned)
    label = f"rank ≤ {args.rank}" if args.rank is not None else f"energy {args.energy}"
    print(f"extracting a LoRA ({label}, {args.method} SVD) of every changed Linear/Conv2d weight "
          "(relative error ‖ΔW − up·down‖_F / ‖ΔW‖_F):", file=out)
    try:
        result = extract_lora(base, tuned, args.rank, energy=args.energy, max_rank=args.max_rank, method=args.method)
    except ValueError as exc:
        raise CLIError(f"cannot extract: {exc}") from None
    ranks = result.ranks
    worst, mean = _print_errors(result.errors, out, lambda c, p: f"r={ranks[c][p]}, {result.methods[c][p]}")
    for component, changed in result.unrepresented.items():
        for key, change in changed.items():
            print(f"  not in the LoRA: {component}.{key} changed by {change:.3e} (relative)", file=out)
    result.attach(base, "extracted", activate=False)
    unrepresented = sorted(f"{c}.{k}" for c, changed in result.unrepresented.items() for k in changed)
    metadata = {PREFIX + "extraction": json.dumps({"rank": args.rank, "energy": args.energy, "max_relative_error": worst,
                                                   "mean_relative_error": mean, "unrepresented": unrepresented})}
    written = _write_adapter(base, "extracted", target, args, metadata, "the extracted LoRA")
    print(f"wrote {written} ({args.to}, {sum(len(v) for v in ranks.values())} layers)", file=out)
    return 0


def fuse(args, out=sys.stdout) -> int:
    _check_adapters(args.adapter)
    target = Path(args.out)
    _check_parent(target)
    if args.single_file and target.suffix != ".safetensors":
        raise CLIError(f"--single-file writes one .safetensors file; give --out NAME.safetensors, not {target.name}")
    if not args.single_file and target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise CLIError(f"{target} exists; the diffusers folder is written to a new (or empty) folder")
    pipe = _load_pipe(args.model)
    try:
        infos = fuse_adapter_files(pipe, args.adapter, strict=not args.skip_unknown, allow_pickle=args.allow_pickle)
    except (ValueError, TypeError, OSError) as exc:
        raise CLIError(f"cannot fuse the adapters into {args.model}: {exc}") from None
    for (path, weight), info in zip(args.adapter, infos):
        print(f"fused {path} × {weight:g}: {info.format}, "
              f"{', '.join(f'{a} ({n} layers)' for a, n in info.algorithms.items())}", file=out)
    try:
        written = _save(lambda: save_fused(pipe, target, single_file=args.single_file, base_model=args.model,
                                           adapters=args.adapter), target, "the fused model")
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    kind = "one safetensors file; reload with lycoris_lite.tools.fused.load_fused" if args.single_file else \
        "diffusers folder; reload with DiffusionPipeline.from_pretrained"
    print(f"wrote {written} ({kind})", file=out)
    return 0


def inspect(args, out=sys.stdout) -> int:
    info = describe(args.file, allow_pickle=args.allow_pickle, top_tags=args.top_tags)
    if args.model:
        components = _load_model(args.model)
        try:
            read = files.read_adapter(components, args.file, "inspect", strict=False, allow_pickle=args.allow_pickle)
        except (ValueError, TypeError, OSError) as exc:
            raise CLIError(f"{args.file} does not fit {args.model}: {exc}") from None
        loaded = files.loaded_info(read)
        info["model"] = args.model
        info["coverage"] = loaded.coverage
        info["skipped_keys"] = loaded.skipped_keys
        info["coverage_line"] = loaded.coverage_line()
        info["layout"] = loaded.layout
        split: dict[str, list[str]] = {}
        for component, paths in loaded.coverage.items():
            for path, source in paths.items():
                split.setdefault(source, []).append(f"{component}.{path}")
        info["fused_modules"] = {source: paths for source, paths in split.items() if len(paths) > 1}
    report = json.dumps(info, indent=2, default=str) if args.json else format_report(info)
    if args.model and not args.json:
        report += f"\non {args.model}:  {info['coverage_line']}"
        if info["fused_modules"]:
            first, paths = next(iter(info["fused_modules"].items()))
            report += (f"\nfused modules: {len(info['fused_modules'])} split exactly onto "
                       f"{sum(map(len, info['fused_modules'].values()))} modules (e.g. {first} -> {', '.join(paths)})")
    print(report, file=out)
    return 0


# ---- entry point ---------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lycoris_lite",
        description="Inspect, convert, combine and extract adapter files; fuse them into a model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{inspect,convert,combine,extract,fuse}")

    p = sub.add_parser("inspect", help="describe an adapter file or folder (no model needed)",
                       description="Describe an adapter: format, algorithms, ranks, alphas, family, metadata.")
    p.add_argument("file", metavar="FILE", help="a .safetensors file, a diffusers folder or a PEFT folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--top-tags", type=_positive_int, default=10, metavar="N",
                   help="how many trigger words to list from ss_tag_frequency (default 10)")
    p.add_argument("--allow-pickle", action="store_true", help="read .ckpt/.pt/.bin (torch.load, weights_only)")
    p.add_argument("--model", default=None, metavar="tiny-sd|tiny-flux|…|PATH",
                   help="also map the file onto this model: which modules apply where, which match nothing")
    p.set_defaults(func=inspect)

    c = sub.add_parser("convert", help="convert between formats, or extract a LoRA (--rank)",
                       description="Convert an adapter losslessly, or write a rank-N LoRA extracted from it.")
    c.add_argument("input", metavar="IN", help="the adapter (file or folder)")
    c.add_argument("output", metavar="OUT", help="the file (kohya, diffusers) or folder (peft, diffusers) to write")
    c.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    c.add_argument("--rank", type=_positive_int, default=None, metavar="N",
                   help="write a LoRA of rank ≤ N extracted from each layer's effective ΔW (lossy; errors printed)")
    c.add_argument("--model", required=True, metavar="tiny-sd|tiny-sdxl|PATH",
                   help="the base model: maps module names and gives the base weights")
    c.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype of the written tensors")
    c.add_argument("--skip-unknown", action="store_true", help="skip modules that match no layer of the model")
    c.add_argument("--allow-pickle", action="store_true", help="read .ckpt/.pt/.bin inputs (torch.load, weights_only)")
    c.set_defaults(func=convert)

    def adapters_and_model(p, what):
        p.add_argument("--model", required=True, metavar="tiny-sd|tiny-sdxl|PATH", help=f"the base model {what}")
        p.add_argument("--adapter", required=True, action="append", type=_adapter_arg, metavar="FILE[:WEIGHT]",
                       help="an adapter file or folder and its weight (default 1); repeat for each adapter")
        p.add_argument("--skip-unknown", action="store_true", help="skip modules that match no layer of the model")
        p.add_argument("--allow-pickle", action="store_true",
                       help="read .ckpt/.pt/.bin inputs (torch.load, weights_only)")

    m = sub.add_parser("combine", help="write a weighted combination of adapters as one LoRA",
                       description="Combine adapters of any algorithms into one LoRA (PEFT's combination types).")
    adapters_and_model(m, "the adapters belong to")
    m.add_argument("--out", required=True, metavar="OUT", help="the file (kohya, diffusers) or folder (peft) to write")
    m.add_argument("--type", default="svd", choices=COMBINATION_TYPES, help="the combination type (default svd)")
    m.add_argument("--rank", type=_positive_int, default=None, metavar="N",
                   help="rank of the result of the *svd types (default: the largest input LoRA rank)")
    m.add_argument("--clamp", type=float, default=None, metavar="Q",
                   help="svd types: clamp the factors at this quantile")
    m.add_argument("--density", type=float, default=None, metavar="D",
                   help="ties, dare_* and magnitude_prune types: the fraction of entries kept, in (0, 1]")
    m.add_argument("--majority-sign", default="total", choices=SIGN_METHODS, help="ties types: how the sign is elected")
    m.add_argument("--seed", type=int, default=0, help="seed of the DARE masks (default 0)")
    m.add_argument("--to", default="kohya", choices=FORMATS, help="the format to write (default kohya)")
    m.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype of the written tensors")
    m.set_defaults(func=combine)

    e = sub.add_parser("extract", help="extract a LoRA from a fully fine-tuned model",
                       description="A LoRA of a fine-tuned model's weight changes, with each layer's error.")
    e.add_argument("--base", required=True, metavar="tiny-sd|tiny-sdxl|PATH", help="the base model")
    e.add_argument("--tuned", required=True, metavar="PATH", help="the fine-tuned model (same architecture)")
    size = e.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=_positive_int, default=None, metavar="N", help="the LoRA rank of every layer")
    size.add_argument("--energy", type=float, default=None, metavar="F",
                      help="per layer, the smallest rank keeping this fraction of ‖ΔW‖² (in (0, 1])")
    e.add_argument("--max-rank", type=_positive_int, default=None, metavar="N", help="cap on the --energy ranks")
    e.add_argument("--method", default="auto", choices=METHODS,
                   help="SVD: randomized where accurate enough (auto), or forced")
    e.add_argument("--out", required=True, metavar="OUT", help="the file (kohya, diffusers) or folder (peft) to write")
    e.add_argument("--to", default="kohya", choices=FORMATS, help="the format to write (default kohya)")
    e.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype of the written tensors")
    e.set_defaults(func=extract)

    g = sub.add_parser("fuse", aliases=["merge"], help="fuse adapters into the model and save it (kohya's merge)",
                       description="Fuse adapters into the model; save a diffusers folder or one safetensors file.")
    adapters_and_model(g, "to fuse the adapters into")
    g.add_argument("--out", required=True, metavar="OUT",
                   help="a new folder (diffusers), or NAME.safetensors with --single-file")
    g.add_argument("--single-file", action="store_true",
                   help="one safetensors file (component.key tensors; reload with lycoris_lite.tools.fused.load_fused)")
    g.set_defaults(func=fuse)
    return parser


def main(argv: list[str] | None = None, out=None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    out = out or sys.stdout
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: 2 for bad arguments (message on stderr), 0 for --help
        return int(exc.code or 0)
    try:
        return args.func(args, out=out)
    except InspectError as exc:  # CLIError too
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
