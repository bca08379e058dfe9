"""The web UI's logic without a page (``lycoris_lite.integrations.webui``): prompt tags, PNG parameters, safe upload
names, the adapter library and the shared pipeline on the tiny model (stacks, cache, order, fuse, cancel,
concurrency, uploads). Images are 64x64, 2 steps."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from unittest import mock

import numpy as np
from PIL import Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from lycoris_lite import PRESETS, LoRAConfig, controller_for

from lycoris_lite.io import files

from lycoris_lite.integrations import webui
from lycoris_lite.models import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline
from lycoris_lite.integrations.webui import GenerationSettings, StackEntry

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- prompt tags ------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, cleaned, stack", [
    ("a dog <lora:style>", "a dog", [StackEntry("style", 1.0)]),
    ("<lora:style:0.5>, a dog", ", a dog", [StackEntry("style", 0.5)]),
    ("a <lora:s:0.5:1.25> dog", "a dog", [StackEntry("s", 0.5, unet=1.25)]),
    ("a <LYCO:s:te=0.3:unet=0.7> b <lora:t:-1>", "a b", [StackEntry("s", 0.3, unet=0.7), StackEntry("t", -1.0)]),
    ("<lora:s:unet=0>", "", [StackEntry("s", 1.0, unet=0.0)]),
    ("no tags, here", "no tags, here", []),
])
def test_prompt_tags(prompt, cleaned, stack):
    assert webui.parse_prompt(prompt) == (cleaned, stack)


@pytest.mark.parametrize("prompt, message", [
    ("<lora::1>", "names no adapter"), ("<lora:s:x>", "must be a number"), ("<lora:s:nan>", "finite"),
    ("<lora:s:1:2:3>", "dynamic rank"), ("<lora:s:dyn=4>", "dyn= is not supported"),
])
def test_bad_prompt_tags(prompt, message):
    with pytest.raises(ValueError, match=message):
        webui.parse_prompt(prompt)


def test_tags_round_trip_and_effective_stack():
    entries = [StackEntry("a", 0.8), StackEntry("b", 1.0, unet=0.5), StackEntry("c", 0.7, text_encoder=0.2)]
    assert webui.parse_prompt(" ".join(e.tag() for e in entries))[1] == [
        StackEntry("a", 0.8), StackEntry("b", 1.0, unet=0.5), StackEntry("c", 0.2, unet=0.7)]
    assert entries[2].pipeline_weight() == {"unet": 0.7, "text_encoder": 0.2, "text_encoder_2": 0.2,
                                            "text_encoder_3": 0.2}
    blocky = StackEntry("d", 0.5, blocks="down=0.5; up=1,0")
    assert blocky.pipeline_weight("unet", ["down", "mid", "up"]) == {
        "unet": {"down": 0.25, "mid": 0.5, "up": [0.5, 0.0]}, "text_encoder": 0.5, "text_encoder_2": 0.5,
        "text_encoder_3": 0.5}
    assert webui.parse_prompt(blocky.tag()) == ("", [blocky]) and blocky.tag() == "<lora:d:0.5:blocks=down=0.5;up=1,0>"
    ui = [StackEntry("a", 1.0), StackEntry("off", 1.0, enabled=False), StackEntry("zero", 0.0), StackEntry("b", 0.5)]
    tags = [StackEntry("a", 0.25), StackEntry("c", 1.0)]
    assert webui.effective_stack(ui, tags) == [StackEntry("a", 0.25), StackEntry("b", 0.5), StackEntry("c", 1.0)]
    with pytest.raises(ValueError, match="twice"):
        webui.effective_stack([StackEntry("a"), StackEntry("a", 0.5)], [])


@pytest.mark.parametrize("text, message", [
    ("down", "is not group=value"), ("=1", "is not group=value"), ("down=", "is not group=value"),
    ("down=x", "down weight in block weights must be a number"), ("up=1,nan", "finite"),
    ("down=1; down=0", "down is given twice"), ("9x=1", "is not group=value"),
])
def test_bad_block_weights(text, message):
    with pytest.raises(ValueError, match=message):
        webui.parse_block_weights(text)


# ---- AUTOMATIC1111 parameters text ------------------------------------------------------------------
def test_parameters_format_and_parse():
    text = webui.format_parameters("a dog, sitting", "blurry, low: quality", steps=2, sampler="Euler a", guidance=7.5,
                                   seed=42, width=64, height=48, model="tiny-sd",
                                   stack=[StackEntry("a", 0.8), StackEntry("b", 1.0, unet=0.5)],
                                   hashes={"a": "0123456789ab"}, fused=True)
    lines = text.split("\n")
    assert lines[0] == "a dog, sitting <lora:a:0.8> <lora:b:1:0.5>"
    assert lines[1] == "Negative prompt: blurry, low: quality"
    assert lines[2].startswith("Steps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 64x48, Model: tiny-sd, "
                               'Lora hashes: "a: 0123456789ab", Lora fused: True, Version: lycoris-lite ')
    fields = webui.parse_parameters(text)
    assert fields["Prompt"] == lines[0] and fields["Negative prompt"] == "blurry, low: quality"
    assert (fields["Steps"], fields["Seed"], fields["Size"], fields["Lora hashes"]) == ("2", "42", "64x48",
                                                                                     "a: 0123456789ab")


def test_parses_automatic1111_infotext():
    text = ("masterpiece, 1girl <lora:add_detail:0.5>\nNegative prompt: lowres, bad anatomy\n"
            "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
            'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "add_detail: 7c6bad76eb54", '
            "Version: v1.9.0")
    fields = webui.parse_parameters(text)
    assert fields["Prompt"] == "masterpiece, 1girl <lora:add_detail:0.5>"
    assert fields["Negative prompt"] == "lowres, bad anatomy"
    assert fields["Schedule type"] == "Karras" and fields["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert webui.parse_prompt(fields["Prompt"])[1] == [StackEntry("add_detail", 0.5)]


# ---- upload names -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../evil.safetensors", "..\\evil.safetensors", "/etc/evil.safetensors",
                                  "sub/evil.safetensors", ".hidden.safetensors", "a\x00.safetensors", "..", "",
                                  "model.ckpt", "model.pt", "evil.safetensors.exe", "!!!.safetensors"])
def test_unsafe_upload_names_are_refused(name):
    with pytest.raises(ValueError):
        webui.safe_adapter_filename(name)


def test_upload_names_are_normalised():
    assert webui.safe_adapter_filename("my style v1.2.safetensors") == "my_style_v1_2.safetensors"
    assert webui.safe_adapter_filename("ｓｔｙｌｅ.SAFETENSORS") == "style.safetensors"


# ---- the tiny model and its example adapters ----------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    pipe = build_tiny_sd_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    webui.write_example_adapters(pipe, folder)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    return folder


@pytest.fixture(scope="module")
def engine(folder):
    return webui.SharedPipeline(build_tiny_sd_pipeline(), webui.AdapterLibrary(folder), "tiny-sd")


@pytest.fixture(autouse=True)
def clean(request):
    yield
    if "engine" in request.fixturenames:
        engine = request.getfixturevalue("engine")
        engine.unload_all()
        engine.rescan()


def settings(**kwargs) -> GenerationSettings:
    return GenerationSettings(**{"prompt": "a photo of sks dog", "seed": 7, "steps": 2, "width": 64, "height": 64,
                                 **kwargs})


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image) for image in result.images]


def test_library_cards(engine, folder):
    cards = engine.cards
    assert {n: c.algorithm for n, c in cards.items()} == {n: a for n, a, *_ in webui.EXAMPLES}
    assert cards["outline"].trigger_words == ["outline"] and cards["outline"].rank == "r=4"
    assert cards["swap"].rank == "block 4" and cards["night"].trigger_words == ["night"]
    data = (folder / "outline.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert cards["outline"].shorthash == hashlib.sha256(data[8 + header:]).hexdigest()[:12]
    assert cards["outline"].summary() == {
        "Algorithm": "lora", "Rank": "r=4", "Family": "unknown", "Base model": "tiny-sd", "Trigger words": "outline",
        "Tags": "1 distinct in ss_tag_frequency", "File": "outline.safetensors", "Size": f"{cards['outline'].size_bytes / 2**20:.2f} MiB",
        "Hash": cards["outline"].shorthash}
    assert engine.usable_names() == sorted(cards)


def test_search_and_filters(engine):
    cards = engine.cards.values()
    names = lambda *args: [c.name for c in webui.search_cards(cards, *args)]  # noqa: E731
    assert names("") == sorted(engine.cards)
    assert names("SWAPPED") == ["swap"]                      # a trigger word, any case
    assert names("night boft") == ["night"]                  # every word must match
    assert names("tiny-sd hra") == ["zoom"]                  # metadata: base model, algorithm
    assert names("", "oft") == ["swap"] and names("", "loha") == ["snow"]
    assert names("", None, "unknown") == sorted(engine.cards) and names("", None, "SDXL") == []


@pytest.mark.parametrize("prompt, words, expected", [
    ("a photo of a dog", ["watercolor"], "a photo of a dog, watercolor <lora:watercolor:1>"),
    ("", ["sks", "dog"], "sks, dog <lora:watercolor:1>"),
    ("a Watercolor cat", ["watercolor"], "a Watercolor cat <lora:watercolor:1>"),
])
def test_insert_tag(prompt, words, expected):
    assert webui.insert_tag(prompt, "watercolor", words) == expected


def test_insert_tag_refuses_a_second_tag():
    with pytest.raises(ValueError, match="has a tag for watercolor already"):
        webui.insert_tag("a <lora:watercolor:0.5>", "watercolor", [])


def test_previews_sidecars_and_made_on_demand(engine, folder):
    sidecar = folder / "zoom.png"
    Image.new("RGB", (8, 8), "red").save(sidecar)
    made = folder / "swap.preview.png"
    try:
        cards = {c.name: c for c in engine.rescan()}
        assert cards["zoom"].preview == sidecar and cards["swap"].preview is None
        version = engine.library_version
        path = engine.make_preview("swap", settings(prompt="ignored"))
        assert path == made == webui.preview_destination(folder / "swap.safetensors")
        with Image.open(made) as image:
            assert image.size == (64, 64) and image.text["parameters"].startswith("swapped <lora:swap:1>\nSteps: 2")
        alone = engine.generate(settings(prompt="swapped", seed=7), [StackEntry("swap")])
        assert np.array_equal(np.asarray(Image.open(made).convert("RGB")), pixels(alone)[0])
        assert engine.cards["swap"].preview == made and engine.library_version == version + 1
        with pytest.raises(ValueError, match="already has a preview \\(swap.preview.png\\)"):
            engine.make_preview("swap", settings())
        engine.fuse([StackEntry("outline")])
        with pytest.raises(ValueError, match="unfuse it before making previews"):
            engine.make_preview("night", settings())
        assert not (folder / "night.preview.png").exists()
    finally:
        sidecar.unlink()
        made.unlink(missing_ok=True)


def test_library_reads_subfolders_but_not_checkpoints(engine, folder):
    trained = folder / "lokr"
    (trained / "checkpoint-20").mkdir(parents=True)
    (trained / ".tmp-checkpoint-40").mkdir()
    try:
        (trained / "sks_duck_lokr.safetensors").write_bytes((folder / "night.safetensors").read_bytes())
        for skipped in ("checkpoint-20", ".tmp-checkpoint-40"):
            (trained / skipped / "adapter_state.safetensors").write_bytes(b"not read")
        entries = webui.AdapterLibrary(folder).entries()
        assert [p for p in entries if p.parent == trained] == [trained / "sks_duck_lokr.safetensors"]
        assert len(entries) == len(webui.EXAMPLES) + 1
        engine.rescan()
        assert engine.cards["sks_duck_lokr"].usable and engine.cards["sks_duck_lokr"].path.parent == trained
    finally:
        shutil.rmtree(trained)


def test_adapters_sharing_a_file_name_are_named_by_their_paths(engine, folder):
    """Two ``style.safetensors`` in different subfolders: each is named by its path (``a/style``), both
    usable; a root file keeps its stem; the bare stem names no adapter and the error lists the paths."""
    (folder / "a").mkdir()
    (folder / "b.v2").mkdir()
    try:
        for where in ("a/style", "b.v2/style", "a/swap"):
            shutil.copyfile(folder / "outline.safetensors" if "style" in where else folder / "swap.safetensors",
                            folder / f"{where}.safetensors")
        cards = {c.name: c for c in engine.rescan()}
        assert {"a/style", "b_v2/style", "swap", "a/swap"} <= set(cards) and "style" not in cards
        assert all(cards[n].usable for n in ("a/style", "b_v2/style", "swap", "a/swap"))
        assert cards["b_v2/style"].location == "b.v2/style.safetensors" and cards["swap"].location == "swap.safetensors"
        with pytest.raises(ValueError, match="several adapters have that file name; use one of a/style, b_v2/style"):
            engine.card("style")
        same = [pixels(engine.generate(settings(prompt=f"a photo <lora:{n}:0.8>"), []))[0] for n in ("a/swap", "swap")]
        assert np.array_equal(*same)  # the same bytes under two names
        assert [c.name for c in engine.rescan()] == list(cards)  # stable from one scan to the next
    finally:
        shutil.rmtree(folder / "a")
        shutil.rmtree(folder / "b.v2")


def test_waiting_is_reported_only_while_another_generation_holds_the_pipeline(engine):
    phases = []
    engine.generate(settings(), [StackEntry("outline")], on_step=lambda done, total, what: phases.append(what))
    assert phases[:3] == ["applying the stack", "encoding the prompt", "denoising"]
    phases.clear()
    with engine.lock:
        worker = threading.Thread(target=engine.generate, args=(settings(), []),
                                  kwargs={"on_step": lambda done, total, what: phases.append(what)})
        worker.start()
        deadline = time.time() + 30
        while not phases and time.time() < deadline:
            time.sleep(0.01)
        assert phases == ["waiting for the pipeline"]
    worker.join(60)
    assert phases[:3] == ["waiting for the pipeline", "applying the stack", "encoding the prompt"]


def sdxl_file(path):
    pipe = build_tiny_sdxl_pipeline()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        targets = PRESETS["unet-attn"] if component == "unet" else PRESETS["text-encoder"]
        controller_for(getattr(pipe, component)).add_adapter("x", LoRAConfig(r=2, target_modules=targets,
                                                                             init_weights=False))
    return files.save_adapter(pipe, "x", path)


def test_unusable_files_are_marked(engine, folder, tmp_path):
    extra = [folder / "broken.safetensors", folder / "old.ckpt", folder / "xl.safetensors"]
    try:
        extra[0].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
        extra[1].write_bytes(b"pickle")
        sdxl_file(extra[2])
        cards = {c.name: c for c in engine.rescan()}
        assert "unreadable" in cards["broken"].problem
        assert "pickle" in cards["old"].problem
        assert "SDXL" in cards["xl"].problem
        assert engine.usable_names() == sorted(n for n, *_ in webui.EXAMPLES)
        with pytest.raises(ValueError, match="cannot be used"):
            engine.generate(settings(prompt="a <lora:xl:1>"), [])
    finally:
        for path in extra:
            path.unlink()


# ---- stacks, switching, cache ----------------------------------------------------------------------------
def test_generation_is_reproducible_from_its_parameters(engine):
    stack = [StackEntry("outline", 0.8), StackEntry("swap", 1.0, unet=0.5, text_encoder=-0.5)]
    first = engine.generate(settings(negative_prompt="blurry", count=2), stack)
    assert first.seeds == [7, 8] and [e.name for e in first.stack] == ["outline", "swap"]
    base = engine.generate(settings(count=2), [])
    assert all(np.abs(a.astype(int) - b).mean() > 1 for a, b in zip(pixels(first), pixels(base)))
    # image 2 alone, from its own PNG text: the tags in its prompt line carry the stack
    fields = webui.parse_parameters(first.images[1].info["parameters"])
    assert fields["Seed"] == "8" and fields["Negative prompt"] == "blurry"
    again = engine.generate(settings(prompt=fields["Prompt"], negative_prompt="blurry", seed=8), [])
    assert again.stack == [StackEntry("outline", 0.8), StackEntry("swap", -0.5, unet=0.5)]
    assert np.array_equal(pixels(again)[0], pixels(first)[1])


def test_switching_cached_stacks_reads_no_disk(engine):
    a = [StackEntry("outline", 0.8), StackEntry("night", 0.6)]
    b = [StackEntry("swap", 1.0), StackEntry("zoom", 0.5)]
    images = {id(s): pixels(engine.generate(settings(), s)) for s in (a, b)}
    reads = engine.disk_loads
    with mock.patch.object(files, "read_state_dict", side_effect=AssertionError("disk read")) as read, \
            mock.patch("builtins.open", side_effect=AssertionError("file opened")):
        for stack in (b, a):
            result = engine.generate(settings(), stack)
            assert result.loaded_from_disk == [] and np.array_equal(pixels(result)[0], images[id(stack)][0])
    assert read.call_count == 0 and engine.disk_loads == reads


def test_stack_order_is_the_composition_order(engine):
    # OFT and BOFT both rotate the output side, with 4x4 blocks: the order matters
    one, two = [StackEntry("swap"), StackEntry("night")], [StackEntry("night"), StackEntry("swap")]
    first = pixels(engine.generate(settings(), one))[0]
    second = engine.generate(settings(), two)
    assert second.loaded_from_disk == ["swap"]  # re-attached after night
    assert np.abs(pixels(second)[0].astype(int) - first).max() > 0  # rotations do not commute
    assert np.array_equal(pixels(engine.generate(settings(), one))[0], first)
    engine.unload_all()  # as if this session were alone: nothing attached before
    assert np.array_equal(pixels(engine.generate(settings(), two))[0], pixels(second)[0])


@pytest.fixture
def small_cache(engine):
    engine.max_loaded = 2
    yield engine
    engine.max_loaded = 8


def test_least_recently_used_adapters_leave(small_cache):
    engine = small_cache
    for name in ("outline", "swap", "outline", "zoom"):
        engine.apply([StackEntry(name)])
    assert engine.status()["loaded"] == ["outline", "zoom"]
    applied, read = engine.apply([StackEntry("zoom"), StackEntry("swap"), StackEntry("night")])
    assert read == ["swap", "night"] and engine.pipe.get_active_adapters() == ["zoom", "swap", "night"]
    assert engine.status()["loaded"] == ["zoom", "swap", "night"]  # a stack larger than the cache still runs


def active_state(engine):
    return engine.pipe.get_active_adapters(), {n: i["weight"] for n, i in engine.pipe.list_adapters().items()}


def test_errors_leave_the_pipeline_as_it_was(engine, folder, tmp_path):
    engine.generate(settings(), [StackEntry("outline", 0.5)])
    before, image = active_state(engine), pixels(engine.generate(settings(), [StackEntry("outline", 0.5)]))
    target = folder / "swap.safetensors"
    saved = target.read_bytes()
    try:
        target.write_bytes(saved[: len(saved) // 2])  # truncated after the scan: the load fails
        for stack, prompt, message in [
            ([StackEntry("nope")], "a", "no adapter named 'nope'"),
            ([StackEntry("outline", float("nan"))], "a", "finite"),
            ([StackEntry("outline")], "a <lora:zoom:x>", "must be a number"),
            ([StackEntry("zoom"), StackEntry("swap")], "a", "truncated or corrupt"),
        ]:
            with pytest.raises(ValueError, match=message):
                engine.generate(settings(prompt=prompt), stack)
            assert active_state(engine)[0] == before[0]
    finally:
        target.write_bytes(saved)
    assert active_state(engine)[1]["outline"] == before[1]["outline"]
    assert np.array_equal(pixels(engine.generate(settings(), [StackEntry("outline", 0.5)]))[0], image[0])


def test_fused_stack_is_used_by_everyone_until_unfused(engine):
    stack = [StackEntry("outline", 0.8), StackEntry("zoom", 0.5)]
    original = {k: v.clone() for k, v in engine.pipe.unet.state_dict().items()}
    unfused = pixels(engine.generate(settings(), stack))[0]
    assert engine.fuse(stack) == stack and engine.status()["fused"] == stack
    other = engine.generate(settings(prompt="a photo of sks dog <lora:swap:1>"), [StackEntry("night")])
    assert other.fused and other.stack == stack and "fused" in other.notes[0]
    assert "Lora fused: True" in other.parameters[0]
    assert np.abs(pixels(other)[0].astype(int) - unfused).max() <= 2  # fused weights round differently
    with pytest.raises(ValueError, match="already fused"):
        engine.fuse([StackEntry("swap")])
    engine.unfuse()
    assert engine.status()["fused"] is None
    assert np.array_equal(pixels(engine.generate(settings(), stack))[0], unfused)
    engine.unload_all()
    assert all(torch.equal(v, original[k]) for k, v in engine.pipe.unet.state_dict().items())


def test_cancel_stops_a_running_generation(engine):
    steps = []
    outcome = {}

    def run():
        try:
            engine.generate(settings(steps=150), [StackEntry("outline")], session="s1",
                            on_step=lambda done, total, what: steps.append(done))
        except webui.GenerationCancelled as exc:
            outcome["cancelled"] = str(exc)

    worker = threading.Thread(target=run)
    worker.start()
    while len(steps) < 3:
        time.sleep(0.01)
    assert not engine.cancel("someone-else") and engine.cancel("s1")
    worker.join(30)
    assert "cancelled after" in outcome["cancelled"] and max(steps) < 150
    assert engine.lock.acquire(timeout=1)  # released
    engine.lock.release()


def test_concurrent_sessions_get_their_own_images(engine):
    stacks = {"a": [StackEntry("outline", 0.8), StackEntry("swap", 0.5)],
              "b": [StackEntry("zoom", -1.0), StackEntry("night", 1.5)]}
    alone = {s: pixels(engine.generate(settings(), stack))[0] for s, stack in stacks.items()}
    calls = []
    hook = engine.pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(threading.get_ident()))
    results, threads = {}, []
    try:
        for s, stack in stacks.items():
            threads.append(threading.Thread(target=lambda s=s, stack=stack: results.__setitem__(
                s, engine.generate(settings(), stack))))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        hook.remove()
    assert all(np.array_equal(pixels(r)[0], alone[s]) for s, r in results.items()) and len(results) == 2
    runs = [calls[i] for i in range(len(calls)) if i == 0 or calls[i] != calls[i - 1]]
    assert len(runs) == 2  # each generation's UNet calls came in one block: never interleaved


# ---- uploads ---------------------------------------------------------------------------------------------
def test_uploads_are_validated_before_anything_is_saved(engine, folder, tmp_path):
    source = folder / "outline.safetensors"
    names = sorted(p.name for p in folder.iterdir())

    def refused(path, name, message, max_bytes=2**20):
        with pytest.raises(ValueError, match=message):
            engine.add_upload(path, name, max_bytes=max_bytes)
        assert sorted(p.name for p in folder.iterdir()) == names and not (tmp_path / "evil.safetensors").exists()

    refused(source, "../evil.safetensors", "unsafe file name")
    refused(source, "outline.safetensors", "already in the adapters folder")
    refused(source, "big.safetensors", "the limit is", max_bytes=1000)
    refused(source, "x.ckpt", "only .safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(source.read_bytes()[:5000])
    refused(tmp_path / "corrupt.safetensors", None, "truncated")
    state = load_file(source)
    key = next(iter(state))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, tmp_path / "nan.safetensors")
    refused(tmp_path / "nan.safetensors", None, "NaN")
    refused(sdxl_file(tmp_path / "xl.safetensors"), None, "SDXL")
    refused(source, "dup.safetensors", r"already in the library as outline \(outline.safetensors\)")
    state = load_file(source)
    state[key] = state[key] * 1.5
    save_file(state, tmp_path / "changed.safetensors")
    card = engine.add_upload(tmp_path / "changed.safetensors", "my copy.safetensors", max_bytes=2**20)
    try:
        assert card.name == "my_copy" and card.usable and (folder / "my_copy.safetensors").is_file()
        assert "my_copy" in engine.usable_names()
    finally:
        (folder / "my_copy.safetensors").unlink()
