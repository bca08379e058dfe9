"""Reliability under faults, load and bad input (issue 8): the harness in ``tests/reliability/`` at small
sizes (``benchmarks/bench_reliability.py`` runs it at full size for the figures in benchmarks/README.md).

* hostile files: the mutation fuzzer over every format and algorithm (200 cases covering every mutation
  and every seed file), in forked workers so a segfault or a hang would be seen, plus targeted files;
* drift: fuse/unfuse cycles of a mixed stack in float32, float16 and bfloat16 are bitwise exact;
* leaks: load/fuse/unfuse/unload cycles leave memory and the number of live tensors where they were;
* killed mid-write: adapter saves (kohya, PEFT) and training checkpoints SIGKILLed at random moments;
* bad arguments: the command line, the trainer's options and the web UI's inputs.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lycoris_lite.io.files import read_adapter
from lycoris_lite.io.formats.safe_io import AdapterFileError, check_safetensors_header, read_state_dict
from tests.reliability.bad_inputs import (TRAINER_BAD_ARGUMENTS, UI_BAD_INPUTS, bad_input_files, cached_tiny_models,
                                          run_cli_bad_arguments, run_ui_bad_inputs, trainer_in_process)
from tests.reliability.corpus import MUTATIONS, build_corpus, case_plan
from tests.reliability.cycles import drift, leak_cycles, make_stack_files
from tests.reliability.file_bytes import RunsCode, deflated, join_safetensors, load_tensors, pickle_bytes, save_tensors
from tests.reliability.fuzzing import error_origin, fuzz, is_clean, use_adapter
from tests.reliability.killing import adapter_versions, checkpoint_kill_writes, kill_during_writes
from tests.reliability.memory import MiB, peak, reset_peak, rss
from tests.reliability.subjects import (ALGOS, ROOT, UI_APP, fuzz_pipe, load_script, model_changes, model_state,
                                        tiny_pipe, trainer_args)

pytestmark = pytest.mark.usefixtures("one_thread")
FUZZ_SEED = 4  # 200 cases of this run cover every mutation and every seed file (asserted below)


@pytest.fixture(scope="module")
def pipe():
    """The fuzzing target: the tiny SD pipeline with a two-level UNet."""
    return fuzz_pipe()


@pytest.fixture(scope="module")
def corpus(pipe, tmp_path_factory):
    return build_corpus(pipe, tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def pristine(pipe):
    return model_state(pipe)


# ---- hostile files -------------------------------------------------------------------------------------
def test_fuzzing_every_format_and_algorithm_gives_clean_errors_and_leaves_the_model_alone(pipe, corpus):
    cases = 200
    planned = [case_plan(i, corpus, FUZZ_SEED)[1:] for i in range(cases)]
    assert {m for _, m in planned} == set(MUTATIONS)
    assert {s.name for s, _ in planned} == {s.name for s in corpus}
    assert {(s.format, s.algo) for s in corpus} >= {(f, a) for f in ("kohya", "peft") for a in ALGOS}

    report = fuzz(pipe, corpus, cases, master_seed=FUZZ_SEED, workers=2, time_limit=600)
    summary = report.summary()
    assert summary["cases"] == cases
    assert report.crashes == [], [(r["mutation"], r["error"], r["message"], r.get("origin")) for r in report.crashes]
    assert report.changed == [] and report.code_ran == []
    outcomes = report.counts()
    assert outcomes["clean"] > cases / 2 and outcomes["accepted"] > 0  # both paths are exercised
    assert all(r["message"] for r in report.results if r["outcome"] == "clean")
    if summary["peak_measured"]:  # a lie about sizes costs nothing: it is refused before anything is read
        for m in ("shape-lie", "offset-lie", "header-length-lie", "dtype-lie", "truncate"):
            assert summary["max_peak_extra_mib_by_mutation"].get(m, 0) < 16, m


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    return join_safetensors(header, data)


def _entry(dtype="F32", shape=(4,), start=0, end=16):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}


@pytest.mark.parametrize("name,blob,message", [
    ("huge-shape", _safetensors({"a.lora_down.weight": _entry(shape=(2 ** 40, 2 ** 40), end=2 ** 82)}), "declares shape"),
    ("duplicate", join_safetensors(None, b"\0" * 16, b'{"a":' + json.dumps(_entry()).encode() + b',"a":'
                                   + json.dumps(_entry()).encode() + b"}"), "twice"),
    ("nested", join_safetensors(None, b"", b"[" * 100_000), "not valid JSON"),
    ("long-number", join_safetensors(None, b"", b'{"a": ' + b"9" * 5000 + b"}"), "not valid JSON"),
    ("metadata-not-strings", _safetensors({"__metadata__": {"a": 5}}), "strings to strings"),
    ("shape-not-a-list", _safetensors({"a": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}}, b"\0" * 16),
     "invalid shape"),
    ("offsets-text", _safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": "ab"}}, b"\0" * 16),
     "invalid data_offsets"),
    ("dtype-list", _safetensors({"a": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),
     "unknown dtype"),
    ("bool-shape", _safetensors({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
     "invalid shape"),
    ("pickle", pickle_bytes({"a": torch.zeros(4)}), "not a safetensors file"),
])
def test_hostile_headers_are_refused_before_anything_is_read(tmp_path, name, blob, message):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(blob)
    with pytest.raises(AdapterFileError, match=message) as info:
        read_state_dict(path)
    assert is_clean(info.value)
    if name == "huge-shape":  # declares 2^80 elements in a file of a few hundred bytes
        reset_peak()
        rest = rss()
        with pytest.raises(AdapterFileError):
            check_safetensors_header(path)
        assert peak() - rest < 4 * MiB


def test_pickles_never_run_code_and_compressed_archives_are_refused(tmp_path):
    marker = tmp_path / "CODE_RAN"
    state = {"a.lora_down.weight": torch.zeros(4, 4)}
    (tmp_path / "evil.ckpt").write_bytes(pickle_bytes({"state_dict": state, "x": RunsCode(str(marker))}))
    (tmp_path / "bare.pt").write_bytes(pickle.dumps(RunsCode(str(marker))))
    (tmp_path / "bomb.pt").write_bytes(deflated(pickle_bytes({"a": torch.zeros(MiB)})))
    (tmp_path / "fine.pt").write_bytes(pickle_bytes(state))
    for name, message in [("evil.ckpt", "weights_only"), ("bare.pt", "not a torch.save zip archive"),
                          ("bomb.pt", "compressed records")]:
        with pytest.raises(AdapterFileError, match=message):
            read_state_dict(tmp_path / name, allow_pickle=True)
    with pytest.raises(AdapterFileError, match="pickle file.*refused"):
        read_state_dict(tmp_path / "fine.pt")
    assert read_state_dict(tmp_path / "fine.pt", allow_pickle=True)[0].keys() == state.keys()
    assert not marker.exists()
    assert (tmp_path / "bomb.pt").stat().st_size < 64 * 1024  # it would have inflated to 4 MiB


def _peft_seed(corpus, algo):
    return next(s for s in corpus if s.name == f"peft-{algo}")


def _write(files: dict, folder: Path) -> Path:
    for name, blob in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(blob)
    return folder


def test_files_that_used_to_load_and_fail_later_are_refused_at_load(pipe, corpus, pristine, tmp_path):
    """Each of these loaded, then crashed in the forward or in the fuse (found by the fuzzer)."""
    loha = _peft_seed(corpus, "loha").files
    name = "unet/adapter_model.safetensors"
    state, meta = load_tensors(loha[name])
    missing = dict(state)
    del missing[next(k for k in state if k.endswith("hada_w2_a"))]
    wrong = dict(state)
    key = next(k for k in state if k.endswith("hada_w1_a"))
    wrong[key] = wrong[key][:-1]
    kohya = next(s for s in corpus if s.name == "kohya-lora").files
    (kohya_name, kohya_blob), = kohya.items()
    k_state, k_meta = load_tensors(kohya_blob)
    zero = dict(k_state)
    key = next(k for k in zero if k.endswith("lora_down.weight"))
    zero[key] = zero[key][:0]
    config = json.loads(_peft_seed(corpus, "lora").files["unet/adapter_config.json"])
    cases = [
        ("missing", {**loha, name: save_tensors(missing, meta)}, "missing the tensor|do not match the expected"),
        ("wrong-shape", {**loha, name: save_tensors(wrong, meta)}, "shape|do not form"),
        ("zero-rank", {kohya_name: save_tensors(zero, k_meta)}, "empty"),
        ("float8", {kohya_name: save_tensors({k: v.to(torch.float8_e4m3fn) for k, v in k_state.items()},
                                             k_meta)}, None),
        ("int", {kohya_name: save_tensors({k: v.to(torch.int64) for k, v in k_state.items()}, k_meta)},
         "floating point"),
        ("config-r-dict", {**_peft_seed(corpus, "lora").files,
                           "unet/adapter_config.json": json.dumps({**config, "r": {"a": 1}}).encode()}, "r=.*integer"),
        ("config-regex", {**_peft_seed(corpus, "lora").files, "unet/adapter_config.json": json.dumps(
            {**config, "rank_pattern": {"(": 3}}).encode()}, "not a regular expression"),
    ]
    for case, files, message in cases:
        folder = _write(files, tmp_path / case)
        source = folder / kohya_name if kohya_name in files else folder
        if message is None:  # float8 is a float format: it loads and works
            pipe.load_adapter(source, "x")
            use_adapter(pipe)
            pipe.unload_adapters()
        else:
            with pytest.raises(ValueError, match=message) as info:
                pipe.load_adapter(source, "x")
            assert is_clean(info.value), (case, error_origin(info.value))
        assert model_changes(pipe, pristine) == [], case


def test_header_metadata_the_fuzzer_found_is_refused_cleanly(pipe, corpus, pristine, tmp_path):
    """Header metadata that made loading raise from inside ``json``/``re`` (found by the fuzzer): our
    rotation sides holding a 5000-digit number, a diffusers LoraConfig whose rank_pattern is no regex."""
    def with_metadata(seed_name, key, value):
        (name, blob), = next(s for s in corpus if s.name == seed_name).files.items()
        state, meta = load_tensors(blob)
        path = tmp_path / f"{seed_name}.safetensors"
        path.write_bytes(save_tensors(state, {**meta, key: value}))
        return path

    config = {"r": 4, "lora_alpha": 4, "rank_pattern": {"to_q(": 2}}
    for path, message in [
        (with_metadata("kohya-lora", "lycoris_lite.rotation_sides", "{\"a\": " + "9" * 5000 + "}"),
         "rotation_sides is not (valid JSON|a mapping)"),  # JSON or not: Python's digit limit may be lifted
        (with_metadata("kohya-lora", "lycoris_lite.rotation_sides", json.dumps({"a": "left"})), "'input'/'output'"),
        (with_metadata("diffusers-lora", "lora_adapter_metadata", json.dumps({f"unet.{k}": v for k, v in config.items()})),
         "rank_pattern key 'to_q\\(' is not a regular expression"),
    ]:
        with pytest.raises(ValueError, match=message) as info:
            pipe.load_adapter(path, "x")
        assert is_clean(info.value), error_origin(info.value)
        assert model_changes(pipe, pristine) == []


# ---- drift and leaks -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack_files(pipe, tmp_path_factory):
    return make_stack_files(pipe, tmp_path_factory.mktemp("stack"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fuse_unfuse_cycles_are_bitwise_exact(pipe, stack_files, dtype):
    result = drift(pipe, stack_files, dtype, cycles=50, seed=1)
    assert result["cycles"] == 50 and result["fusing_changed_weights"]
    assert result["max_difference"] == 0.0 and result["bitwise"]
    assert result["unload_bitwise"]


def test_load_unload_cycles_do_not_grow_memory(pipe, corpus, tmp_path):
    source = tmp_path / "loha.safetensors"
    source.write_bytes(next(iter(next(s for s in corpus if s.name == "kohya-loha").files.values())))
    result = leak_cycles(pipe, source, cycles=20, fuse=True)
    assert result["live_tensors_last"] == result["live_tensors_first"] == result["live_tensors_max"]
    assert result["growth_trimmed"] < 0.01, result["rss_trimmed_mib"]


# ---- killed mid-write ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_a_save_killed_at_random_moments_leaves_the_old_or_the_new_adapter(pipe, tmp_path, fmt):
    versions, target = adapter_versions(pipe, tmp_path, fmt, big_metadata=1 << 20)
    try:
        result = kill_during_writes(lambda v: pipe.save_adapter(v[0], target, format=fmt, metadata=v[1]),
                                    versions, target, kills=6, seed=3,
                                    verify=lambda p: read_adapter(pipe, p, "check"))
    finally:
        pipe.unload_adapters()
    assert result["kills"] == 6 and result["partial_or_mixed"] == 0, result["problems"]
    assert result["temporaries_after_next_save"] == 0


def test_a_peft_folder_save_replaces_a_previous_save_whole_but_never_foreign_files(pipe, tmp_path):
    versions, target = adapter_versions(pipe, tmp_path, "peft", big_metadata=10)
    try:
        pipe.save_adapter("v1", target, format="peft")
        assert {p.name for p in target.iterdir()} == {"unet", "text_encoder"}
        pipe.save_adapter("v0", target, format="peft")  # a complete v0: nothing of v1 remains
        assert json.loads((target / "unet" / "adapter_config.json").read_text())["r"] == 4
        (target / "notes.txt").write_text("mine")  # a folder with a foreign file is written into, file by file
        pipe.save_adapter("v1", target, format="peft")
        assert (target / "notes.txt").read_text() == "mine"
        assert json.loads((target / "unet" / "adapter_config.json").read_text())["r"] == 8
    finally:
        pipe.unload_adapters()


def test_checkpoint_writes_killed_at_random_moments_leave_complete_checkpoints(tmp_path):
    result = checkpoint_kill_writes(tmp_path, kills=6, seed=4)
    assert result["kills"] == 6 and result["problems"] == 0, result["examples"]
    assert result["hidden_leftovers_after_cleanup"] == 0


# ---- bad arguments ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    return bad_input_files(tiny_pipe(), tmp_path_factory.mktemp("cli"))


def test_command_line_bad_arguments_exit_2_name_the_problem_and_write_nothing(cli_inputs):
    with cached_tiny_models():
        results = run_cli_bad_arguments(cli_inputs)
    failing = [r for r in results if not (r["exit"] == 2 and r["message_ok"] and not r["written"])]
    assert failing == []
    assert not any(r["code_ran"] for r in results)


#: refused after parsing, by the trainer's checks of folders, models and checkpoints
TRAINER_MAIN_LEVEL = {"missing-images", "missing-model", "resume-missing", "target-matching-nothing"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in TRAINER_BAD_ARGUMENTS
                                  if c[0] not in TRAINER_MAIN_LEVEL or c[0] == "resume-missing"])
def test_trainer_bad_options_exit_2_with_a_message_before_anything_is_written(case, tmp_path, capsys):
    from lycoris_lite.integrations.training import options

    case_id, overrides, message = case
    (tmp_path / "bad.toml").write_text("learning_rat = 0.1\n")
    argv = trainer_args(tmp_path / "out", **{k: v.format(tmp=tmp_path) if isinstance(v, str) else v
                                             for k, v in overrides.items()})
    if case_id == "resume-missing":  # refused by the trainer after parsing, before the model loads
        code, text = trainer_in_process(argv)
    else:
        with pytest.raises(SystemExit) as info:
            options.parse_args(argv)
        code, text = info.value.code, capsys.readouterr().err
    assert code == 2 and re.search(message, text), text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("toml,message", [
    ("learning_rate = -1.0", r"--learning_rate must be a finite number > 0, got -1.0"),
    ("adam_beta2 = nan", r"--adam_beta2 must be a finite number in \[0, 1\), got nan"),
    ("seed = -3", r"--seed must be in \[0, 4294967295\], got -3"),
    ('output_name = "sub/name"', r"--output_name must be a plain file name"),
])
def test_trainer_ranges_apply_to_values_from_config_files(tmp_path, capsys, toml, message):
    from lycoris_lite.integrations.training import options

    (tmp_path / "run.toml").write_text(toml + "\n")
    argv = trainer_args(tmp_path / "out", seed=None, learning_rate=None, config=tmp_path / "run.toml")
    with pytest.raises(SystemExit) as info:
        options.parse_args(argv)
    assert info.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_trainer_range_edges_and_the_clipping_off_value_are_accepted(tmp_path):
    from lycoris_lite.integrations.training import options

    args = options.parse_args(trainer_args(
        tmp_path / "out", max_grad_norm=0, seed=2**32 - 1, adam_beta1=0, lr_warmup_steps=0, max_train_steps=None,
        num_train_epochs=0.5, noise_offset=0, prior_loss_weight=0, output_name="sks_duck.v2"))
    assert (args.max_grad_norm, args.seed, args.adam_beta1, args.num_train_epochs) == (0, 2**32 - 1, 0, 0.5)
    assert args.output_name == "sks_duck.v2"


@pytest.fixture(scope="module")
def ui_engine(tmp_path_factory):
    pytest.importorskip("gradio")
    app = load_script(UI_APP, "lycoris_ui_app_for_tests")
    return app.open_engine("tiny-sd", tmp_path_factory.mktemp("ui") / "adapters")


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in UI_BAD_INPUTS])
def test_ui_bad_inputs_get_a_message_and_change_nothing(ui_engine, tmp_path, case):
    (result,) = run_ui_bad_inputs(ui_engine, tmp_path, cases=[case])
    assert result["outcome"] == "gr.Error" and result["message_ok"], result
    assert not result["written"]


def test_the_benchmark_command_line_refuses_unknown_sections():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_reliability.py"), "--only", "fuzz,speed"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown section(s) ['speed']" in proc.stderr, proc.stderr[-2000:]


def test_a_truncated_header_length_is_a_clean_error(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 10 ** 6) + b"{}")
    with pytest.raises(AdapterFileError, match="exceeds the file size"):
        read_state_dict(path)


def test_our_safetensors_reader_equals_safetensors_for_every_dtype_aligned_or_not(tmp_path):
    """read_state_dict reads the data section once and views into it (safetensors 0.8's loader keeps
    Python memory per tensor read); the tensors must equal safetensors' own, misaligned spans included."""
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {f"t.{dtype}".replace("torch.", ""): (torch.randn(3, 5, generator=gen) * 50).to(dtype)
               for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                             torch.int16, torch.int8, torch.uint8, torch.bool)}
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(2.5)
    aligned = tmp_path / "aligned.safetensors"
    save_file(tensors, str(aligned), metadata={"k": "v"})
    state, metadata = read_state_dict(aligned)
    assert metadata == {"k": "v"} and state.keys() == tensors.keys()
    for key, value in load_file(str(aligned)).items():
        assert state[key].dtype == value.dtype and state[key].shape == value.shape and torch.equal(state[key], value), key

    # a hand-made file whose float32 tensor starts at byte 3 of the data section
    small, wide = torch.arange(3, dtype=torch.uint8), torch.randn(2, 3, generator=gen)
    header = json.dumps({"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                         "b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [3, 27]}}).encode()
    odd = tmp_path / "misaligned.safetensors"
    odd.write_bytes(struct.pack("<Q", len(header)) + header + small.numpy().tobytes() + wide.numpy().tobytes())
    state, _ = read_state_dict(odd)
    assert torch.equal(state["a"], small) and torch.equal(state["b"], wide)
    assert torch.equal(load_file(str(odd))["b"], wide)


def test_atomic_writes_leave_no_temporaries_even_when_the_writer_fails(tmp_path):
    from lycoris_lite.io.formats.safe_io import atomic_write

    target = tmp_path / "adapter.safetensors"

    def failing(tmp):
        Path(tmp).write_bytes(b"partial")
        (Path(tmp).parent / ".tmpXYZ").write_bytes(b"the writer's own temporary")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert list(tmp_path.iterdir()) == []
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"whole"))
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"] and target.read_bytes() == b"whole"
