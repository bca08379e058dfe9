"""Bad arguments to the three surfaces users type into: the command line, the trainer's options and the
web UI's inputs. Each must be refused with a message that names the problem, and write nothing."""

from __future__ import annotations

import contextlib
import copy
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

from lycoris_lite.integrations import cli
from lycoris_lite.models import loading

from .file_bytes import RunsCode, load_tensors, pickle_bytes, save_tensors
from .subjects import TRAINER, UI_APP, UI_SLOTS, load_script, make_adapter, trainer_args, child_env


# ---- the command line ------------------------------------------------------------------------------------
#: (id, argv, what stderr must say). ``{name}`` is replaced by a path from :func:`bad_input_files`.
CLI_BAD_ARGUMENTS = [
    ("no-command", [], r"required"),
    ("unknown-command", ["frobnicate"], r"invalid choice: 'frobnicate'"),
    ("unknown-option", ["inspect", "{lora}", "--bogus"], r"unrecognized arguments: --bogus"),
    ("inspect-no-file", ["inspect"], r"required: FILE"),
    ("inspect-missing", ["inspect", "{missing}"], r"missing\.safetensors: no such file"),
    ("inspect-corrupt", ["inspect", "{junk}"], r"junk\.safetensors: not a safetensors file"),
    ("inspect-truncated", ["inspect", "{truncated}"], r"truncated\.safetensors: .*(truncated|corrupt|exceeds)"),
    ("inspect-top-tags-0", ["inspect", "{lora}", "--top-tags", "0"], r"--top-tags: must be a positive integer, got 0"),
    ("inspect-top-tags-text", ["inspect", "{lora}", "--top-tags", "many"], r"--top-tags: must be a positive integer"),
    ("inspect-pickle", ["inspect", "{ckpt}"], r"ckpt is a pickle file.*refused"),
    ("inspect-code-pickle", ["inspect", "{evil}", "--allow-pickle"], r"evil\.ckpt: .*(weights_only|archive)"),
    ("inspect-empty-folder", ["inspect", "{empty}"], r"a folder without an adapter"),
    ("inspect-peft-no-weights", ["inspect", "{peft_no_weights}"], r"not found: .*adapter_model\.safetensors"),
    ("convert-missing", ["convert", "{missing}", "{out}", "--to", "kohya", "--model", "tiny-sd"], r"no such file"),
    ("convert-no-to", ["convert", "{lora}", "{out}", "--model", "tiny-sd"], r"required: --to"),
    ("convert-bad-format", ["convert", "{lora}", "{out}", "--to", "onnx", "--model", "tiny-sd"],
     r"invalid choice: 'onnx'"),
    ("convert-bad-dtype", ["convert", "{lora}", "{out}", "--to", "kohya", "--model", "tiny-sd", "--dtype", "float8"],
     r"invalid choice: 'float8'"),
    ("convert-rank-0", ["convert", "{lora}", "{out}", "--to", "kohya", "--model", "tiny-sd", "--rank", "0"],
     r"--rank: must be a positive integer, got 0"),
    ("convert-rank-float", ["convert", "{lora}", "{out}", "--to", "kohya", "--model", "tiny-sd", "--rank", "2.5"],
     r"--rank: must be a positive integer"),
    ("convert-unknown-model", ["convert", "{lora}", "{out}", "--to", "kohya", "--model", "tiny-no-such-model"],
     r"cannot load the model 'tiny-no-such-model'"),
    ("convert-nan", ["convert", "{nan}", "{out}", "--to", "kohya", "--model", "tiny-sd"], r"NaN/Inf"),
    ("convert-wrong-family", ["convert", "{sdxl}", "{out}", "--to", "kohya", "--model", "tiny-sd"],
     r"for SDXL"),
    ("convert-out-under-a-file", ["convert", "{lora}", "{notes}/out.safetensors", "--to", "kohya", "--model",
                                  "tiny-sd"], r"notes\.txt is a file, not a folder"),
    ("convert-out-is-in", ["convert", "{lora}", "{lora}", "--to", "kohya", "--model", "tiny-sd"], r"OUT is IN"),
    ("convert-oft-to-diffusers", ["convert", "{oft}", "{out}", "--to", "diffusers", "--model", "tiny-sd"],
     r"cannot hold this adapter.*--rank"),
    ("combine-weight-nan", ["combine", "--model", "tiny-sd", "--adapter", "{lora}:nan", "--out", "{out}"],
     r"must be a finite number, got 'nan'"),
    ("combine-weight-text", ["combine", "--model", "tiny-sd", "--adapter", "{lora}:heavy", "--out", "{out}"],
     r"lora\.safetensors:heavy: no such file"),
    ("combine-no-out", ["combine", "--model", "tiny-sd", "--adapter", "{lora}"], r"required: --out"),
    ("combine-bad-type", ["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--type", "mean", "--out", "{out}"],
     r"invalid choice: 'mean'"),
    ("combine-density-text", ["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--type", "ties", "--density",
                              "half", "--out", "{out}"], r"--density: invalid float value: 'half'"),
    ("combine-density-0", ["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--adapter", "{oft}", "--type",
                           "ties", "--density", "0", "--out", "{out}"], r"density must be a number in \(0, 1\]"),
    ("combine-density-nan", ["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--adapter", "{oft}", "--type",
                             "ties", "--density", "nan", "--out", "{out}"], r"density must be a number in \(0, 1\]"),
    ("combine-clamp-2", ["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--clamp", "2", "--out", "{out}"],
     r"svd_clamp must be a quantile in \(0, 1\]"),
    ("combine-seed-text", ["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--seed", "x", "--out", "{out}"],
     r"--seed: invalid int value: 'x'"),
    ("combine-sign", ["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--majority-sign", "most", "--out",
                      "{out}"], r"invalid choice: 'most'"),
    ("combine-peft-file", ["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--to", "peft", "--out",
                           "{out}"], r"peft format is a folder"),
    ("combine-nan", ["combine", "--model", "tiny-sd", "--adapter", "{nan}", "--out", "{out}"], r"NaN/Inf"),
    ("extract-no-size", ["extract", "--base", "tiny-sd", "--tuned", "tiny-sd", "--out", "{out}"],
     r"one of the arguments --rank --energy is required"),
    ("extract-energy-0", ["extract", "--base", "tiny-sd", "--tuned", "tiny-sd", "--energy", "0", "--out", "{out}"],
     r"energy must be a number in \(0, 1\]"),
    ("extract-energy-nan", ["extract", "--base", "tiny-sd", "--tuned", "tiny-sd", "--energy", "nan", "--out",
                            "{out}"], r"energy must be a number in \(0, 1\]"),
    ("extract-max-rank-0", ["extract", "--base", "tiny-sd", "--tuned", "tiny-sd", "--energy", "0.5", "--max-rank",
                            "0", "--out", "{out}"], r"--max-rank: must be a positive integer"),
    ("extract-bad-method", ["extract", "--base", "tiny-sd", "--tuned", "tiny-sd", "--rank", "4", "--method", "qr",
                            "--out", "{out}"], r"invalid choice: 'qr'"),
    ("extract-tuned-is-a-file", ["extract", "--base", "tiny-sd", "--tuned", "{lora}", "--rank", "4", "--out",
                                 "{out}"], r"cannot load the model"),
    ("fuse-missing-adapter", ["fuse", "--model", "tiny-sd", "--adapter", "{missing}", "--out", "{outdir}"],
     r"no such file"),
    ("fuse-weight-inf", ["fuse", "--model", "tiny-sd", "--adapter", "{lora}:inf", "--out", "{outdir}"], r"finite"),
    ("fuse-out-exists", ["fuse", "--model", "tiny-sd", "--adapter", "{lora}", "--out", "{full}"], r"exists"),
    ("fuse-single-file-suffix", ["fuse", "--model", "tiny-sd", "--adapter", "{lora}", "--single-file", "--out",
                                 "{out_bin}"], r"\.safetensors"),
    ("fuse-nan", ["fuse", "--model", "tiny-sd", "--adapter", "{nan}", "--out", "{outdir}"], r"NaN/Inf"),
    # kohya's name for the command
    ("merge-pickle", ["merge", "--model", "tiny-sd", "--adapter", "{ckpt}", "--out", "{outdir}"], r"pickle.*refused"),
]


def bad_input_files(pipe, folder: Path) -> dict[str, Path]:
    """The inputs :data:`CLI_BAD_ARGUMENTS` names, made on ``pipe`` (the tiny SD pipeline) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    lora = make_adapter(pipe, folder / "lora.safetensors", "lora", seed=60, targets="unet-attn")
    oft = make_adapter(pipe, folder / "oft.safetensors", "oft", seed=61, targets="unet-attn")
    state, meta = load_tensors(lora.read_bytes())
    key = next(k for k in state if k.endswith("lora_up.weight"))
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    (folder / "nan.safetensors").write_bytes(save_tensors(state, meta))
    clean, _ = load_tensors(lora.read_bytes())
    (folder / "sdxl.safetensors").write_bytes(save_tensors(
        {k.replace("lora_te_", "lora_te2_"): v for k, v in clean.items()}, meta))
    (folder / "model.ckpt").write_bytes(pickle_bytes(clean))
    (folder / "evil.ckpt").write_bytes(pickle_bytes({"state_dict": clean, "x": RunsCode(str(folder / "CODE_RAN"))}))
    (folder / "junk.safetensors").write_bytes(b"\x80\x04 this is not a safetensors file at all")
    (folder / "truncated.safetensors").write_bytes(lora.read_bytes()[:5000])
    (folder / "notes.txt").write_text("a file, not a folder")
    (folder / "empty").mkdir(exist_ok=True)
    (folder / "full").mkdir(exist_ok=True)
    (folder / "full" / "keep.txt").write_text("mine")
    peft = make_adapter(pipe, folder / "peft_no_weights", "lora", "peft", seed=62, targets="unet-attn")
    for p in peft.rglob("adapter_model.safetensors"):
        p.unlink()
    peft = peft / "unet"
    return {"lora": lora, "oft": oft, "nan": folder / "nan.safetensors", "sdxl": folder / "sdxl.safetensors",
            "ckpt": folder / "model.ckpt", "evil": folder / "evil.ckpt", "junk": folder / "junk.safetensors",
            "truncated": folder / "truncated.safetensors", "notes": folder / "notes.txt", "empty": folder / "empty",
            "full": folder / "full", "peft_no_weights": peft, "missing": folder / "missing.safetensors",
            "out": folder / "out.safetensors", "outdir": folder / "fused", "out_bin": folder / "fused.bin"}


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


@contextlib.contextmanager
def cached_tiny_models():
    """``tiny-sd``/``tiny-sdxl`` built once and deep-copied for each command (building takes seconds): the
    builders ``load_pipeline`` calls are replaced while the block runs."""
    built = {}

    def cached(builder):
        def build(*args, **kwargs):
            if args or kwargs:
                return builder(*args, **kwargs)
            if builder not in built:
                built[builder] = builder()
            return copy.deepcopy(built[builder])
        return build

    with mock.patch.object(loading, "build_tiny_sd_pipeline", cached(loading.build_tiny_sd_pipeline)), \
            mock.patch.object(loading, "build_tiny_sdxl_pipeline", cached(loading.build_tiny_sdxl_pipeline)):
        yield


def run_cli_bad_arguments(names: dict[str, Path], cases=None) -> list[dict]:
    """Each bad command line through ``lycoris_lite.integrations.cli.main`` in this process: its exit status, whether
    stderr says what :data:`CLI_BAD_ARGUMENTS` expects, and whether anything was written (every file
    under the inputs' folder compared before and after)."""
    folder = names["lora"].parent
    results = []
    for case_id, argv, message in cases or CLI_BAD_ARGUMENTS:
        before = _tree(folder)
        argv = [a.format(**names) for a in argv]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli.main(argv)
            except BaseException as exc:  # noqa: BLE001 - an escaping exception is a finding
                code = f"raised {type(exc).__name__}: {exc}"
        text = err.getvalue()
        after = _tree(folder)
        written = sorted(set(after) - set(before)) + sorted(k for k in before if after.get(k) != before[k])
        results.append({"id": case_id, "exit": code, "message_ok": bool(re.search(message, text, re.S)),
                        "written": written, "stderr": text.strip().splitlines()[-1][:300] if text.strip() else "",
                        "code_ran": (folder / "CODE_RAN").exists()})
        for p in set(after) - set(before):  # undo, so the next case starts from the same tree
            path = folder / p
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
    return results


# ---- the trainer -----------------------------------------------------------------------------------------
#: (id, options changed in a valid short run (None: left out), what stderr must say). Every one must stop
#: with exit status 2 before anything is written.
TRAINER_BAD_ARGUMENTS = [
    ("learning-rate-text", {"learning_rate": "fast"}, r"--learning_rate: invalid float value: 'fast'"),
    ("learning-rate-negative", {"learning_rate": -1}, r"--learning_rate"),
    ("learning-rate-nan", {"learning_rate": "nan"}, r"--learning_rate"),
    ("learning-rate-inf", {"learning_rate": "inf"}, r"--learning_rate"),
    ("text-encoder-lr-negative", {"train_text_encoder": True, "text_encoder_lr": -1}, r"--text_encoder_lr"),
    ("rank-0", {"rank": 0}, r"r >= 1"),
    ("rank-negative", {"rank": -4}, r"non-negative integer, got -4"),
    ("alpha-nan", {"alpha": "nan"}, r"alpha"),
    ("unknown-algo", {"algo": "dora"}, r"invalid choice: 'dora'"),
    ("block-size-0", {"algo": "oft", "block_size": 0}, r"block_size >= 1"),
    ("dropout-1.5", {"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
    ("resolution-60", {"resolution": 60}, r"multiple of 8"),
    ("batch-0", {"train_batch_size": 0}, r"--train_batch_size must be >= 1"),
    ("steps-0", {"max_train_steps": 0}, r"--max_train_steps must be >= 1"),
    ("epochs-0", {"max_train_steps": None, "num_train_epochs": 0}, r"--num_train_epochs"),
    ("warmup-negative", {"lr_warmup_steps": -5}, r"--lr_warmup_steps"),
    ("max-grad-norm-nan", {"max_grad_norm": "nan"}, r"--max_grad_norm"),
    ("adam-beta1-1.5", {"adam_beta1": 1.5}, r"beta"),
    ("adam-epsilon-negative", {"adam_epsilon": -1}, r"epsilon"),
    ("snr-gamma-negative", {"snr_gamma": -1}, r"--snr_gamma"),
    ("prior-loss-weight-nan", {"prior_loss_weight": "nan"}, r"--prior_loss_weight"),
    ("workers-negative", {"dataloader_num_workers": -1}, r"num_workers"),
    ("seed-too-big", {"seed": 2 ** 70}, r"--seed"),
    ("output-name-with-folder", {"output_name": "../escaped"}, r"--output_name"),
    ("save-precision", {"save_precision": "fp8"}, r"invalid choice: 'fp8'"),
    ("unknown-preset", {"unet_targets": "unet-atention"}, r"unknown preset 'unet-atention'"),
    ("target-matching-nothing", {"unet_targets": "to_qq"}, r"match no module"),
    ("missing-images", {"instance_data_dir": "{tmp}/nowhere"}, r"no such folder"),
    ("missing-model", {"pretrained_model_name_or_path": "{tmp}/no-model"}, r"not found"),
    ("resume-missing", {"resume_from_checkpoint": "{tmp}/no-checkpoint"}, r"--resume_from_checkpoint"),
    ("config-missing", {"config": "{tmp}/nope.toml"}, r"--config .*nope\.toml: no such file"),
    ("config-bad-key", {"config": "{tmp}/bad.toml"}, r"unknown option 'learning_rat'"),
]


def run_trainer_bad_arguments(folder: Path, cases=None, in_process: bool = True) -> list[dict]:
    """Each bad trainer option: exit status, message, and whether anything was written under
    ``folder`` (the output folder, the config files and the scratch paths all live there)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bad.toml").write_text('learning_rat = 0.1\n')
    results = []
    for case_id, overrides, message in cases or TRAINER_BAD_ARGUMENTS:
        out = folder / "out"
        argv = trainer_args(out, **{k: v.format(tmp=folder) if isinstance(v, str) else v for k, v in overrides.items()})
        before = _tree(folder)
        if in_process:
            code, text = trainer_in_process(argv)
        else:
            proc = subprocess.run([sys.executable, str(TRAINER), *argv], capture_output=True, text=True, timeout=600,
                                  env=child_env())
            code, text = proc.returncode, proc.stderr
        after = _tree(folder)
        written = sorted(set(after) - set(before)) + sorted(k for k in before if after.get(k) != before[k])
        results.append({"id": case_id, "exit": code, "message_ok": bool(re.search(message, text, re.S)),
                        "written": written[:5],
                        "stderr": text.strip().splitlines()[-1][:300] if text.strip() else ""})
        shutil.rmtree(out, ignore_errors=True)
    return results


def trainer_in_process(argv: list[str]) -> tuple[object, str]:
    """``main(argv)`` of the trainer in this process (accelerate's process state reset first)."""
    from accelerate.state import AcceleratorState, GradientState

    script = load_script(TRAINER, "train_dreambooth_for_reliability")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = script.main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # noqa: BLE001 - an escaping exception is a finding
            code = f"raised {type(exc).__name__}"
            err.write(f"{type(exc).__name__}: {exc}")
    return code, err.getvalue()


# ---- the web UI ------------------------------------------------------------------------------------------
#: (id, handler, arguments, what the message must say): wrong types, out-of-range numbers, unknown names
UI_BAD_INPUTS = [
    ("weight-text", "set_stack", {"slot": (True, "outline", "heavy", None, None, None)}, r"weight"),
    ("weight-nan", "set_stack", {"slot": (True, "outline", float("nan"), None, None, None)}, r"finite"),
    ("weight-inf", "set_stack", {"slot": (True, "outline", float("inf"), None, None, None)}, r"finite"),
    ("unet-weight-text", "set_stack", {"slot": (True, "outline", 1.0, "x", None, None)}, r"weight"),
    ("blocks-text", "set_stack", {"slot": (True, "outline", 1.0, None, None, "down=x")}, r"down weight .* must be a number"),
    ("blocks-no-group", "set_stack", {"slot": (True, "outline", 1.0, None, None, "0.5")}, r"is not group=value"),
    ("blocks-unknown-group", "set_stack", {"slot": (True, "outline", 1.0, None, None, "sideways=1")},
     r"block groups are down, mid, up"),
    ("unknown-adapter", "set_stack", {"slot": (True, "nope", 1.0, None, None, None)}, r"no adapter named 'nope'"),
    ("path-as-adapter", "set_stack", {"slot": (True, "../swap", 1.0, None, None, None)}, r"no adapter named '\.\./swap'"),
    ("seed-text", "generate", {"seed": "x"}, r"seed"),
    ("seed-negative", "generate", {"seed": -5}, r"seed must be"),
    ("seed-huge", "generate", {"seed": 2 ** 70}, r"seed must be"),
    ("steps-0", "generate", {"steps": 0}, r"steps must be"),
    ("steps-huge", "generate", {"steps": 10_000}, r"steps must be"),
    ("steps-text", "generate", {"steps": "many"}, r"steps"),
    ("steps-nan", "generate", {"steps": float("nan")}, r"steps"),
    ("cfg-nan", "generate", {"guidance": float("nan")}, r"CFG scale must be a finite number"),
    ("cfg-negative", "generate", {"guidance": -1}, r"CFG scale must be"),
    ("cfg-text", "generate", {"guidance": "x"}, r"CFG"),
    ("width-63", "generate", {"width": 63}, r"width must be a multiple of 8"),
    ("width-huge", "generate", {"width": 100_000}, r"width must be"),
    ("width-text", "generate", {"width": "wide"}, r"width"),
    ("count-0", "generate", {"count": 0}, r"number of images must be"),
    ("sampler-unknown", "generate", {"sampler": "nope"}, r"unknown sampler 'nope'"),
    ("tag-weight-text", "generate", {"prompt": "a <lora:outline:abc>"}, r"must be a number, got 'abc'"),
    ("tag-unknown-adapter", "generate", {"prompt": "a <lora:nope:1>"}, r"no adapter named 'nope'"),
    ("tag-weight-nan", "generate", {"prompt": "a <lora:outline:nan>"}, r"finite"),
    ("upload-none", "add_adapter", {"file": None}, r"Choose a \.safetensors file"),
    ("upload-unsafe-name", "add_adapter", {"file": "{tilt}", "name": "../../evil.safetensors"}, r"unsafe file name"),
    ("upload-corrupt", "add_adapter", {"file": "{corrupt}"}, r"truncated|corrupt|not a safetensors"),
    ("upload-pickle", "add_adapter", {"file": "{pickle}", "name": "model.ckpt"}, r"safetensors|pickle"),
]


def run_ui_bad_inputs(engine, folder: Path, max_upload_bytes: int = 600_000, cases=None) -> list[dict]:
    """Each bad input through the UI's handlers (what a page event calls; a stack row is followed by a
    generation with that stack, as the Generate button does): a ``gr.Error`` whose message says what
    :data:`UI_BAD_INPUTS` expects (any other exception shows as a bare "Error" on the page), and the
    adapters folder unchanged."""
    import gradio as gr

    handlers = load_script(UI_APP, "lycoris_ui_app_for_reliability").Handlers(engine, max_upload_bytes)
    library = engine.library.folder
    tilt = next(library.rglob("swap.safetensors"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.safetensors").write_bytes(tilt.read_bytes()[:3000])
    state, _ = load_tensors(tilt.read_bytes())
    (folder / "model.ckpt").write_bytes(pickle_bytes(state))
    files = {"tilt": str(tilt), "corrupt": str(folder / "corrupt.safetensors"), "pickle": str(folder / "model.ckpt")}
    generate = {"prompt": "a photo of sks dog", "negative": "", "seed": 3, "steps": 2, "guidance": 7, "width": 64,
                "height": 64, "count": 1, "sampler": "Default"}
    results = []
    for case_id, handler, args, message in cases or UI_BAD_INPUTS:
        before = _tree(library)
        if handler == "set_stack":  # the Generate button: set_stack, then generate with its stack
            def call():
                stack, _ = handlers.set_stack(*args["slot"], *[v for _ in range(UI_SLOTS - 1)
                                                               for v in (True, None, 1.0, None, None, None)])
                return handlers.generate(*generate.values(), stack, progress=lambda *a, **k: None)
        elif handler == "generate":
            values = {**generate, **args}
            call = lambda: handlers.generate(*values.values(), [], progress=lambda *a, **k: None)  # noqa: E731
        else:
            file = args["file"].format(**files) if args["file"] else None
            call = lambda: handlers.add_adapter(file, args.get("name", ""))  # noqa: E731
        try:
            call()
            outcome, text = "accepted", ""
        except gr.Error as exc:
            outcome, text = "gr.Error", str(exc.message if hasattr(exc, "message") else exc)
        except Exception as exc:  # noqa: BLE001 - the page would show a bare "Error"
            outcome, text = f"raised {type(exc).__name__}", str(exc)
        written = _tree(library) != before
        results.append({"id": case_id, "outcome": outcome, "message_ok": outcome == "gr.Error" and
                        bool(re.search(message, text, re.S)), "written": written, "message": text[:200]})
    return results
