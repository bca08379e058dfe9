"""The web page (ui/app.py): its handlers called directly, the app served in-process and driven with
gradio_client (stack, scale, generate, fuse, unload, two sessions at once, cancel, uploads, what is not
served), and ``python ui/app.py`` in a real browser (Playwright driving Debian's Chromium)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from playwright.sync_api import expect, sync_playwright
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lycoris_lite.integrations import webui
from lycoris_lite.models import build_tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "outputs" / "test-artifacts"
SLOTS = 3
MAX_UPLOAD = 600_000          # bytes; the example adapters are 0.1-0.3 MB
GENERATE = ("a photo of sks dog", "", 3, 2, 7, 64, 64, 1, "Default")  # prompt … sampler
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def load_app():
    spec = importlib.util.spec_from_file_location("lycoris_ui_app", ROOT / "ui" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


app = load_app()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slots(*entries) -> list:
    """The /set_stack arguments: per slot (on, adapter, weight, UNet weight, text-encoder weight, blocks)."""
    values = []
    for i in range(SLOTS):
        name, weight, *split = entries[i] if i < len(entries) else (None, 1.0)
        values += [True, name, weight, *(split + [None, None, None])[:3]]
    return values


def image_of(gallery) -> np.ndarray:
    return np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    before = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp / "gradio")
    engine = app.open_engine("tiny-sd", tmp / "adapters")          # writes the example adapters
    demo = app.build_app(engine, slots=SLOTS, max_upload_bytes=MAX_UPLOAD, size=64, steps=2, refresh_seconds=60)
    _, url, _ = app.launch(demo, engine, port=free_port(), prevent_thread_lock=True, quiet=True,
                           max_upload_bytes=MAX_UPLOAD)
    try:
        yield SimpleNamespace(url=url, engine=engine, folder=engine.library.folder)
    finally:
        demo.close()
        if before is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = before


@pytest.fixture(scope="module")
def clients(served, tmp_path_factory):
    """Three sessions (gradio_client keeps one session per Client), for the whole module."""
    tmp = tmp_path_factory.mktemp("downloads")
    made = [Client(served.url, verbose=False, download_files=str(tmp / str(i))) for i in range(3)]
    yield made
    for client in made:
        client.close()


@pytest.fixture(autouse=True)
def clean(served):
    yield
    served.engine.unload_all()


# ---- handlers ---------------------------------------------------------------------------------------
def test_handlers_directly(served):
    h = app.Handlers(served.engine, MAX_UPLOAD)
    stack, rows = h.set_stack(*slots(("outline", 0.8), ("swap", 0.5, 0.25, None)))
    assert stack == [webui.StackEntry("outline", 0.8), webui.StackEntry("swap", 0.5, unet=0.25)]
    assert rows == [[1, "outline", "lora", 0.8, 0.8, 0.8, ""], [2, "swap", "oft", 0.5, 0.25, 0.5, ""]]
    with pytest.raises(gr.Error, match="twice"):
        h.set_stack(*slots(("swap", 1.0), ("swap", 0.5)))
    gallery, text, status, seed, texts, seeds = h.generate(*GENERATE, stack, progress=lambda *a, **k: None)
    assert gallery[0][1] == "seed 3" and gallery[0][0].info["parameters"] == text == texts[0] and seed == 3
    assert seeds == [3]
    assert text.startswith("a photo of sks dog <lora:outline:0.8> <lora:swap:0.5:0.25>\nSteps: 2, Sampler: DDIM")
    assert "read from disk: outline, swap" in status
    assert "no disk read" in h.generate(*GENERATE, stack, progress=lambda *a, **k: None)[2]
    with pytest.raises(gr.Error, match="no adapter named 'nope'"):
        h.generate("a <lora:nope:1>", *GENERATE[1:], [], progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="steps must be"):
        h.generate(GENERATE[0], "", 3, 0, 7, 64, 64, 1, "Default", [], progress=lambda *a, **k: None)
    assert "Fused for everyone" in h.fuse(stack) and "Fused for everyone" not in h.unfuse()
    assert "attached adapters 0/8" in h.unload_all()
    assert h.cancel() == "Nothing to cancel."
    version, grid, *dropdowns = h.refresh(-1, "", "all", "all", "swap", "gone", None)
    assert version == served.engine.library_version and [c["name"] for c in grid] == sorted(served.engine.cards)
    assert [d.value for d in dropdowns] == ["swap", None, None]
    assert sorted(dropdowns[0].choices) == sorted((n, n) for n in served.engine.usable_names())
    assert h.refresh(version, "", "all", "all", "swap") == (gr.skip(),) * 3
    with pytest.raises(gr.Error, match="no adapter named 'gone'"):
        h.set_stack(*slots(("gone", 1.0)))
    assert h.cards_view("swapped", "all", "all")[0] == {
        "name": "swap", "location": "examples/swap.safetensors", "algorithm": "oft", "rank": "block 4",
        "family": "unknown", "words": "swapped", "problem": "", "preview": ""}
    assert [c["name"] for c in h.cards_view("", "loha", "all")] == ["snow"] and not h.cards_view("", "all", "SDXL")
    assert "<dt>Trigger words</dt><dd>night</dd>" in h.card_details("night")
    click = lambda name, mode, prompt="a cat", names=("swap", None, None): h.card_clicked(  # noqa: E731
        gr.EventData(None, {"name": name, "action": "add"}), None, mode, prompt, "", "all", "all", *names)
    details, prompt, grid, *updates = click("zoom", app.CLICK_MODES[0])
    assert "<h3>zoom</h3>" in details and updates[0] == gr.skip() and updates[1]["value"] == "zoom"
    assert click("zoom", app.CLICK_MODES[1])[1] == "a cat, close-up <lora:zoom:1>"
    with pytest.raises(gr.Error, match="swap is in the stack already \\(slot 1\\)"):
        click("swap", app.CLICK_MODES[0])
    with pytest.raises(gr.Error, match="all 3 slots are in use"):
        click("zoom", app.CLICK_MODES[0], names=("swap", "snow", "outline"))
    assert h.select_image(["x", "y"], [5, 6], gr.SelectData(None, {"index": 1, "value": None})) == ("y", 6)
    with pytest.raises(gr.Error, match="Choose a .safetensors file"):
        h.add_adapter(None, "")


# ---- gradio_client against the served app ----------------------------------------------------------------
def test_stack_scale_and_generate(clients):
    client = clients[0]
    table = client.predict(*slots(("outline", 0.8), ("swap", 0.5)), api_name="/set_stack")
    assert [row[1] for row in table["data"]] == ["outline", "swap"]
    gallery, text, status = client.predict(*GENERATE, api_name="/generate")
    assert Image.open(gallery[0]["image"]).text["parameters"] == text  # the PNG's "parameters" chunk
    assert "<lora:outline:0.8> <lora:swap:0.5>" in text and "Seed: 3" in text and "no disk read" not in status
    first = image_of(gallery)
    client.predict(*slots(("outline", 0.3), ("swap", 0.5)), api_name="/set_stack")
    gallery, text, status = client.predict(*GENERATE, api_name="/generate")
    assert "<lora:outline:0.3>" in text and "no disk read" in status
    assert np.abs(image_of(gallery).astype(int) - first).max() > 0
    client.predict(*slots(("outline", 0.8), ("swap", 0.5)), api_name="/set_stack")
    assert np.array_equal(image_of(client.predict(*GENERATE, api_name="/generate")[0]), first)
    with pytest.raises(AppError, match="no adapter named"):
        client.predict(*slots(("../swap", 1.0)), api_name="/set_stack")


def test_fuse_is_shared_until_unfused_and_unload(clients):
    alice, bob = clients[:2]
    alice.predict(*slots(("zoom", 0.7), ("snow", 1.2)), api_name="/set_stack")
    bob.predict(*slots(("outline", 1.0)), api_name="/set_stack")
    own = image_of(bob.predict(*GENERATE, api_name="/generate")[0])
    status = alice.predict(api_name="/fuse")
    assert "**Fused for everyone:** `<lora:zoom:0.7>` → `<lora:snow:1.2>`" in status
    gallery, text, status = bob.predict(*GENERATE, api_name="/generate")
    assert "fused stack `<lora:zoom:0.7>` → `<lora:snow:1.2>`" in status and "not applied" in status
    assert "Lora fused: True" in text
    assert np.abs(image_of(gallery).astype(int) - own).max() > 0
    with pytest.raises(AppError, match="already fused"):
        bob.predict(api_name="/fuse")
    assert "Fused" not in bob.predict(api_name="/unfuse")
    assert np.array_equal(image_of(bob.predict(*GENERATE, api_name="/generate")[0]), own)
    assert "attached adapters 0/8: none" in alice.predict(api_name="/unload")


def test_two_sessions_generating_at_once_get_their_own_images(clients):
    clients = {"a": clients[0], "b": clients[1]}
    clients["a"].predict(*slots(("outline", 0.8), ("swap", 0.5)), api_name="/set_stack")
    clients["b"].predict(*slots(("zoom", -1.0), ("night", 1.0, None, 0.5)), api_name="/set_stack")
    alone = {k: image_of(c.predict(*GENERATE, api_name="/generate")[0]) for k, c in clients.items()}
    assert np.abs(alone["a"].astype(int) - alone["b"]).max() > 0
    jobs = {k: c.submit(*GENERATE, api_name="/generate") for k, c in clients.items()}
    for k, job in jobs.items():
        assert np.array_equal(image_of(job.result(timeout=120)[0]), alone[k]), k


def test_cancel_stops_the_running_generation(clients):
    client = clients[2]
    client.predict(*slots(("outline", 1.0)), api_name="/set_stack")
    job = client.submit(GENERATE[0], "", 3, 150, 7, 64, 64, 1, "Default", api_name="/generate")
    deadline = time.time() + 60
    while not (job.status().progress_data and job.status().progress_data[0].desc == "denoising"):
        assert time.time() < deadline and not job.done()
        time.sleep(0.05)
    assert re.fullmatch(r"Cancelled \(cancelled after \d+ of 150 steps\)\.", client.predict(api_name="/cancel"))
    assert "Cancelled (cancelled after" in job.result(timeout=30)[2]


def test_uploads_are_checked(served, clients, tmp_path):
    client = clients[2]
    names = sorted(p.name for p in served.folder.iterdir())
    source = served.folder / "examples" / "swap.safetensors"
    with pytest.raises(AppError, match="unsafe file name"):
        client.predict(handle_file(str(source)), "../../evil.safetensors", api_name="/add_adapter")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(source.read_bytes()[:3000])
    with pytest.raises(AppError, match="truncated"):
        client.predict(handle_file(str(corrupt)), "", api_name="/add_adapter")
    big = tmp_path / "big.safetensors"
    big.write_bytes(source.read_bytes() + b"\0" * MAX_UPLOAD)
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the client checks first…
        client.predict(handle_file(str(big)), "", api_name="/add_adapter")
    with big.open("rb") as fh:  # …and the server refuses it anyway
        response = httpx.post(served.url + "gradio_api/upload", files={"files": ("big.safetensors", fh)})
    assert response.status_code == 413
    assert sorted(p.name for p in served.folder.iterdir()) == names
    assert not any(p.name == "evil.safetensors" for p in served.folder.parent.rglob("*"))
    changed = variant(source, tmp_path / "swap.safetensors", 1.1)
    message = client.predict(handle_file(str(changed)), "swap copy.safetensors", api_name="/add_adapter")
    try:
        assert message.startswith("Added **swap_copy** (oft, block 4)")
        assert served.engine.cards["swap_copy"].usable
        client.predict(*slots(("swap_copy", 1.0)), api_name="/set_stack")  # selectable at once
    finally:
        (served.folder / "swap_copy.safetensors").unlink()
        client.predict(api_name="/rescan")


def test_queue_bypass_and_adapter_files_are_closed(served):
    assert served.url.startswith("http://127.0.0.1:")
    direct = httpx.post(served.url + "gradio_api/run/generate", json={"data": list(GENERATE)})
    assert direct.status_code == 404 and "join the queue" in direct.text
    adapter = served.folder / "examples" / "outline.safetensors"
    served_file = httpx.get(served.url + "gradio_api/file=" + str(adapter))
    assert served_file.status_code == 403
    assert httpx.get(served.url + "monitoring").status_code != 200


def test_launch_settings(served):
    seen = {}

    class Recorder:
        def launch(self, **kwargs):
            seen.update(kwargs)

    app.launch(Recorder(), served.engine)
    assert (seen["server_name"], seen["share"], seen["auth"]) == ("127.0.0.1", False, None)
    assert seen["blocked_paths"] == [str(served.folder)] and seen["max_file_size"] == 512 * 2**20
    assert seen["enable_monitoring"] is False and seen["mcp_server"] is False and "api" not in seen["footer_links"]
    assert "plain_toasts" not in seen["head"] and "TransformStream" in seen["head"]


# ---- a shared server: logins, admins, quotas -------------------------------------------------------------
def test_exposed_servers_need_logins_or_allow_anonymous(monkeypatch):
    monkeypatch.delenv("LYCORIS_UI_AUTH", raising=False)
    accounts = lambda *argv: app.accounts_from_args(app.parse_args(list(argv)))  # noqa: E731
    assert accounts() is None and accounts("--host", "localhost") is None
    for argv in (["--host", "0.0.0.0"], ["--host", "192.168.1.5"], ["--share"]):
        with pytest.raises(SystemExit, match="without --auth.*--allow-anonymous"):
            accounts(*argv)
        assert accounts(*argv, "--allow-anonymous") is None
    with pytest.raises(SystemExit, match="--admin needs --auth"):
        accounts("--admin", "ann")
    with pytest.raises(SystemExit, match="USER:PASSWORD"):
        accounts("--auth", "ann")
    with pytest.raises(SystemExit, match="admin.*carl.*no login"):
        accounts("--auth", "ann:pw", "--admin", "carl")
    made = accounts("--host", "0.0.0.0", "--auth", "ann:s3:cret", "--auth", "bob:pw2", "--admin", "ann")
    assert made("ann", "s3:cret") and made("bob", "pw2") and not made("bob", "s3:cret")
    assert made.is_admin("ann") and not made.is_admin("bob") and not made.is_admin(None)
    monkeypatch.setenv("LYCORIS_UI_AUTH", "ann:pw\nbob:pw2")
    assert accounts("--host", "0.0.0.0")("bob", "pw2")


def variant(source: Path, dest: Path, factor: float) -> Path:
    """A copy of adapter ``source`` whose weights differ (another content hash)."""
    with safe_open(str(source), "pt") as fh:
        metadata = fh.metadata()
    state = {k: v * factor if v.is_floating_point() else v for k, v in load_file(str(source)).items()}
    save_file(state, str(dest), metadata=metadata)
    return dest


@pytest.fixture(scope="module")
def guarded(served):
    """The same engine behind logins: ann is the admin, bob and carl are not; 200 kB of uploads per user."""
    accounts = webui.Accounts({"ann": "s3cret:x", "bob": "hunter2", "carl": "pw3"}, ["ann"])
    demo = app.build_app(served.engine, slots=SLOTS, size=64, steps=2, accounts=accounts,
                         upload_quota_bytes=200_000)
    _, url, _ = app.launch(demo, served.engine, port=free_port(), auth=accounts, prevent_thread_lock=True,
                           quiet=True)
    try:
        yield SimpleNamespace(url=url, accounts=accounts)
    finally:
        demo.close()


def test_admins_quotas_and_duplicate_uploads(guarded, served, tmp_path):
    assert httpx.get(guarded.url + "config").status_code == 401
    with pytest.raises(ValueError, match="Could not login"):
        Client(guarded.url, auth=("ann", "wrong"), verbose=False)
    ann = Client(guarded.url, auth=("ann", "s3cret:x"), verbose=False, download_files=str(tmp_path / "ann"))
    bob = Client(guarded.url, auth=("bob", "hunter2"), verbose=False, download_files=str(tmp_path / "bob"))
    swap = served.folder / "examples" / "swap.safetensors"
    added = []
    try:
        assert bob.predict(*slots(("swap", 0.5)), api_name="/set_stack")["data"][0][1] == "swap"
        for api_name, args in (("/fuse", ()), ("/unfuse", ()), ("/unload", ()), ("/rescan", ()),
                               ("/add_adapter", (handle_file(str(variant(swap, tmp_path / "b.safetensors", 1.1))), ""))):
            with pytest.raises(AppError, match="only its admins \\(ann\\) may do it"):
                bob.predict(*args, api_name=api_name)
        with pytest.raises(AppError, match="already in the library as swap \\(examples/swap.safetensors\\)"):
            ann.predict(handle_file(str(swap)), "copy.safetensors", api_name="/add_adapter")
        source = variant(swap, tmp_path / "swap_v1.safetensors", 1.1)  # 154 kB: one fits the 200 kB quota
        message = ann.predict(handle_file(str(source)), "", api_name="/add_adapter")
        added.append(served.folder / source.name)
        assert message.startswith("Added **swap_v1**")
        with pytest.raises(AppError, match="the quota per session is 0.19 MiB"):
            ann.predict(handle_file(str(variant(swap, tmp_path / "swap_v2.safetensors", 1.2))), "",
                        api_name="/add_adapter")
        assert not (served.folder / "swap_v2.safetensors").exists()
        for _ in range(webui.Accounts.max_failures):  # guessing carl's password locks carl out
            assert httpx.post(guarded.url + "login", data={"username": "carl", "password": "guess"}).status_code == 400
        assert httpx.post(guarded.url + "login", data={"username": "carl", "password": "pw3"}).status_code == 400
        assert "attached adapters 0/8" in ann.predict(api_name="/unload")
    finally:
        for client in (ann, bob):
            client.close()
        for path in added:
            path.unlink()
        served.engine.rescan()


def test_logins_are_rate_limited():
    now = [0.0]
    accounts = webui.Accounts({"ann": "pw", "bob": "pw2"}, clock=lambda: now[0])
    for _ in range(accounts.max_failures):
        assert not accounts("ann", "guess")
    assert not accounts("ann", "pw") and accounts.locked("ann")  # locked out, right password or not
    assert accounts("bob", "pw2")                                # other users are not
    now[0] += accounts.window + 1
    assert accounts("ann", "pw")
    for i in range(accounts.max_total_failures):                 # a spray across many user names
        accounts(f"user{i}", "guess")
    assert not accounts("bob", "pw2")
    now[0] += accounts.window + 1
    assert accounts("bob", "pw2")


def test_browser_login_disables_what_only_admins_may_do(browser, guarded, served):
    """bob (not an admin) logs in: the header says who he is, and Fuse, Unfuse, Unload all, Rescan and
    Add to library are disabled for him (ann, the admin, gets them enabled)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1300})
    page = context.new_page()
    page.goto(guarded.url)
    page.get_by_label("username").fill("bob")
    page.get_by_label("password").fill("hunter2")
    page.get_by_role("button", name="Login").click()
    expect(page.locator("#status")).to_contain_text("signed in as bob", timeout=30_000)
    for name in ("Fuse stack", "Unfuse", "Unload all", "Rescan folder", "Add to library"):
        expect(page.get_by_role("button", name=name)).to_be_disabled()
    context.close()
    admin = app.Handlers(served.engine, MAX_UPLOAD, guarded.accounts)
    as_ann = SimpleNamespace(username="ann", session_hash="s")
    assert all(update["interactive"] for update in admin.permissions(as_ann))
    assert "signed in as ann (admin)" in admin.status(as_ann)


# ---- --dtype ---------------------------------------------------------------------------------------------
def test_dtype_defaults_follow_the_device_and_bad_values_are_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert app.parse_args([]).dtype == torch.float32
    assert app.parse_args(["--device", "cpu"]).dtype == torch.float32
    assert app.parse_args(["--device", "cuda"]).dtype == torch.float16  # parsing only: nothing moves to CUDA
    assert app.parse_args(["--dtype", "bfloat16"]).dtype == torch.bfloat16
    assert "warning" not in capsys.readouterr().err
    assert app.parse_args(["--dtype", "float16"]).dtype == torch.float16
    assert "float16 on the CPU is slow" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        app.parse_args(["--dtype", "float64"])
    assert "--dtype: invalid choice: 'float64'" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["tiny-sd", "folder"])
def test_bfloat16_pipeline_renders_with_an_adapter(model, tmp_path):
    if model == "folder":  # a diffusers folder: loaded by from_pretrained(torch_dtype=...)
        model = str(tmp_path / "model")
        build_tiny_sd_pipeline(path=model)
        webui.write_example_adapters(build_tiny_sd_pipeline(), tmp_path / "adapters")
    args = app.parse_args(["--model", model, "--dtype", "bfloat16", "--adapters", str(tmp_path / "adapters")])
    engine = app.open_engine(args.model, args.adapters, dtype=args.dtype)   # tiny-sd writes the example adapters
    weights = [*engine.pipe.unet.parameters(), *engine.pipe.text_encoder.parameters()]
    assert {p.dtype for p in weights} == {torch.bfloat16}
    settings = webui.GenerationSettings("a photo of sks dog", seed=3, steps=2, width=64, height=64)
    base = np.asarray(engine.generate(settings, []).images[0]).astype(int)
    styled = engine.generate(settings, [webui.StackEntry("outline", 1.0)])
    assert styled.loaded_from_disk == ["outline"]
    assert np.abs(np.asarray(styled.images[0]).astype(int) - base).mean() > 1


# ---- a real browser --------------------------------------------------------------------------------------
def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module's browser tests (a fresh page each)."""
    if chromium() is None:
        pytest.skip("Chromium is not installed: `make install` installs Debian's chromium with apt-get where it "
                    "can (root and apt needed); Playwright's own download does not work offline")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    page.goto(url)
    page.wait_for_load_state("load")
    return page


@pytest.fixture
def page(browser, served):
    """The served app (3 slots, 64x64, 2 steps) in a fresh page."""
    opened = open_page(browser, served.url)
    yield opened
    opened.close()


def pick(page, slot: int, name: str) -> None:
    box = page.get_by_role("combobox", name=f"Adapter {slot}")
    box.click()
    page.locator(f"#{box.get_attribute('aria-controls')}").get_by_role("option", name=name, exact=True).click()


def set_number(page, label: str, value) -> None:
    box = page.get_by_label(f"number input for {label}")
    box.fill(str(value))
    box.press("Enter")


def toast(page, text: str):
    return page.get_by_test_id("toast-text").filter(has_text=text).first


def test_browser_picks_an_adapter_moves_its_slider_and_generates(browser, tmp_path, monkeypatch):
    """``python ui/app.py --adapters DIR --port N`` (its main(), in this process; the default model,
    tiny-world, with its trained example adapters) in headless Chromium."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo, url = app.main(["--adapters", str(tmp_path / "adapters"), "--port", str(free_port()), "--slots", "2"],
                         block=False)
    try:
        assert url.startswith("http://127.0.0.1:")
        assert (tmp_path / "adapters" / "examples" / "outline.safetensors").is_file()
        page = open_page(browser, url)
        pick(page, 1, "outline")
        slider = page.get_by_label("range slider for Weight 1")
        slider.focus()
        for _ in range(6):
            slider.press("ArrowLeft")  # 1.0 -> 0.7 in steps of 0.05
        expect(page.get_by_label("number input for Weight 1")).to_have_value("0.7")
        expect(page.locator("table").filter(has_text="outline").first).to_be_visible()
        set_number(page, "Steps", 2)
        page.get_by_label("Prompt", exact=True).fill("a red circle on a green background, outline")
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("#result-gallery img").first).to_be_visible(timeout=90_000)
        expect(page.locator("#parameters textarea")).to_have_value(   # tiny-world, the default: 32x32
            re.compile(r"<lora:outline:0\.7>\nSteps: 2, Sampler: .*Size: 32x32, Model: tiny-world"))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui-generate.png"), full_page=True)
        page.close()
    finally:
        demo.close()


def test_browser_status_split_weights_and_reuse_seed(page, served):
    """Defects 1 and 7: the status line is right as the page loads, not after the first tick of the
    refresh timer (60 s here); the progress says "waiting for the pipeline" only when someone else holds
    it; opening "Separate UNet / text-encoder weights" changes nothing (its fields
    stay empty, the next Generate uses the stack) and a value typed there shows in the stack order;
    "Reuse last" takes the seed of the image selected in the gallery."""
    served.engine.apply([webui.StackEntry("zoom")])
    page.reload()
    expect(page.locator("#status")).to_contain_text("attached adapters 1/8: zoom", timeout=15_000)
    pick(page, 1, "outline")
    order = page.locator("#stack-order")
    expect(order).to_contain_text("outline")
    page.get_by_text("Separate UNet / text-encoder weights").click()
    unet = page.get_by_label("UNet weight 1")
    expect(unet).to_have_value("")
    page.get_by_label("Seed", exact=True).fill("5")
    set_number(page, "Images", 2)
    page.evaluate("""() => {  // every text the gallery shows while it generates (its progress line included)
        const gallery = document.querySelector('#result-gallery');
        window.shown = [];
        new MutationObserver(() => window.shown.push(gallery.innerText))
            .observe(gallery, {subtree: true, childList: true, characterData: true});
    }""")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#parameters textarea")).to_have_value(re.compile(r"<lora:outline:1>\nSteps.*Seed: 5"),
                                                               timeout=60_000)
    shown = page.evaluate("window.shown.join(' | ')")
    assert re.search("applying the stack|encoding the prompt|denoising", shown), shown
    assert "waiting for the pipeline" not in shown  # nobody else was generating
    page.locator("#result-gallery").get_by_role("button", name="Thumbnail 2 of 2").click()
    page.get_by_role("button", name="Reuse last").click()
    expect(page.get_by_label("Seed", exact=True)).to_have_value("6")
    unet.fill("0.25")
    unet.blur()
    expect(order.get_by_role("row").nth(1)).to_contain_text("1 outline lora 1 0.25 1")


def test_browser_uploads_and_names(page, served, tmp_path):
    """Defects 3 and 7: "Added …" appears under the upload box, a long file name and the chosen adapter
    are shown whole; ``examples/swap`` and ``more/swap`` both show after Rescan, with their files, and
    both go into the stack under those names."""
    long_name = tmp_path / "a_rather_long_adapter_file_name_v2_final.safetensors"
    variant(served.folder / "examples" / "swap.safetensors", long_name, 1.2)
    page.locator("#upload input[type=file]").set_input_files(str(long_name))
    stem = page.locator("#upload .filename .stem")
    expect(stem).to_have_text(long_name.stem)
    assert stem.evaluate("e => e.scrollWidth <= e.clientWidth")
    (served.folder / "more").mkdir()
    try:
        page.get_by_role("button", name="Add to library").click()
        added = page.locator("#upload-message")
        expect(added).to_contain_text(f"Added {long_name.stem}", timeout=30_000)
        upload_box, message_box = page.locator("#upload").bounding_box(), added.bounding_box()
        assert 0 <= message_box["y"] - (upload_box["y"] + upload_box["height"]) < 250  # under it, same column
        assert abs(message_box["x"] - upload_box["x"]) < 50
        pick(page, 1, long_name.stem)
        chosen = page.get_by_role("combobox", name="Adapter 1")
        expect(chosen).to_have_value(long_name.stem)
        assert chosen.evaluate("e => e.scrollWidth <= e.clientWidth")
        shutil.copyfile(served.folder / "examples" / "swap.safetensors", served.folder / "more" / "swap.safetensors")
        page.get_by_role("button", name="Rescan folder").click()
        for name in ("examples/swap", "more/swap"):
            card = page.locator(".adapter-card:not(.off)").filter(has_text=f"{name}.safetensors")
            expect(card.locator(".card-name")).to_have_text(name)
        pick(page, 2, "examples/swap")
        pick(page, 3, "more/swap")
        rows = page.locator("#stack-order").get_by_role("row")
        expect(rows.nth(2)).to_contain_text("2 examples/swap oft")
        expect(rows.nth(3)).to_contain_text("3 more/swap oft")
    finally:
        (served.folder / long_name.name).unlink(missing_ok=True)
        shutil.rmtree(served.folder / "more")
        served.engine.rescan()


def test_browser_errors_show_whole_messages_and_leave_the_page_as_it_was(page, served, tmp_path):
    """A bad tag, a tag in the negative prompt, a bad split weight and a refused upload: each toast shows
    the whole message, tags included, and the gallery, stack table and library keep their contents (no
    "Error" overlay)."""
    prompt, negative = page.get_by_label("Prompt", exact=True), page.get_by_label("Negative prompt")
    gallery = page.locator("#result-gallery")
    page.get_by_role("button", name="Generate").click()
    expect(gallery.locator("img").first).to_be_visible(timeout=60_000)
    for text, where, message in [
        ("a <lora:outline:abc> dog", prompt, "a weight in <lora:outline:abc> must be a number, got 'abc'"),
        ("<lora:swap:1>", negative, "<lora:…> tags work in the prompt only, not in the negative prompt"),
    ]:
        prompt.fill("")
        where.fill(text)
        page.get_by_role("button", name="Generate").click()
        expect(toast(page, message)).to_be_visible(timeout=30_000)
        expect(gallery).not_to_contain_text("Error")
        expect(gallery.locator("img").first).to_be_visible()
        negative.fill("")
    pick(page, 1, "swap")
    page.get_by_text("Separate UNet / text-encoder weights").click()
    page.get_by_label("UNet weight 1").fill("abc")
    page.get_by_label("UNet weight 1").blur()
    expect(toast(page, "the UNet weight of swap must be a number, got 'abc'")).to_be_visible(timeout=30_000)
    expect(page.locator("#stack-order")).not_to_contain_text("Error")
    expect(page.locator("#stack-order")).to_contain_text("swap")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes((served.folder / "examples" / "swap.safetensors").read_bytes()[:3000])
    page.locator("#upload input[type=file]").set_input_files(str(corrupt))
    page.get_by_role("button", name="Add to library").click()
    expect(toast(page, "truncated")).to_be_visible(timeout=30_000)
    expect(page.locator("#upload-message")).not_to_contain_text("Error")
    expect(page.locator(".adapter-card")).to_have_count(len(webui.EXAMPLES))


def test_browser_cancel_confirms_in_the_page(page):
    """Cancel answers once the generation has stopped, instead of staying on "Cancelling…"."""
    set_number(page, "Steps", 150)
    for side in ("Width", "Height"):  # slow steps: Gradio drops the answer of a generation it cancels mid-step
        set_number(page, side, 512)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#result-gallery")).to_contain_text("denoising", timeout=30_000)
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#message")).to_have_text(re.compile(r"^\s*Cancelled \(cancelled after \d+ of 150 steps\)\.\s*$"),
                                                  timeout=30_000)


def test_browser_adapter_cards_search_filter_preview_and_add(page, served):
    """The card grid: search and filters narrow it; a sidecar ``name.png`` is the card's preview and "make
    one" renders and keeps one; a click adds the adapter to the stack (or its tag and trigger words to
    the prompt) and shows its metadata card; an adapter that does not fit the model is greyed with the
    reason and adds nothing."""
    examples = served.folder / "examples"
    Image.new("RGB", (32, 32), "red").save(examples / "zoom.png")
    state = load_file(str(examples / "outline.safetensors"))
    down = next(k for k in sorted(state) if k.startswith("lora_unet") and k.endswith("lora_down.weight"))
    state[down] = torch.zeros(state[down].shape[0], state[down].shape[1] + 8)  # trained for a wider model
    save_file(state, str(served.folder / "wide.safetensors"))
    try:
        page.get_by_role("button", name="Rescan folder").click()
        cards = page.locator(".adapter-card")
        expect(cards).to_have_count(len(webui.EXAMPLES) + 1)
        wide = cards.filter(has_text="wide.safetensors")
        expect(wide).to_have_class(re.compile(r"\boff\b"))
        expect(wide).to_contain_text("does not fit this model")
        expect(cards.filter(has_text="zoom").locator("img")).to_have_attribute("src", re.compile("^data:image/png"))
        search = page.get_by_label("Search")
        search.fill("swapped")
        expect(cards).to_have_count(1)
        expect(cards.first.locator(".card-name")).to_have_text("swap")
        search.fill("")
        page.get_by_role("combobox", name="Algorithm").click()
        page.get_by_role("option", name="loha", exact=True).click()
        expect(cards).to_have_count(1)
        cards.first.click()                                     # snow into the first empty slot
        expect(page.get_by_role("combobox", name="Adapter 1")).to_have_value("snow")
        expect(page.locator("#adapter-details").locator("xpath=//dt[.='Trigger words']/following-sibling::dd[1]")
               ).to_have_text("snowy")
        expect(page.locator("#stack-order")).to_contain_text("snow")
        page.get_by_role("combobox", name="Algorithm").click()
        page.get_by_role("option", name="all", exact=True).click()
        expect(cards).to_have_count(len(webui.EXAMPLES) + 1)
        wide.click()                                            # greyed: shows why, adds nothing
        expect(page.locator("#adapter-details")).to_contain_text("Not usable")
        expect(page.get_by_role("combobox", name="Adapter 2")).to_have_value("")
        page.get_by_label("Insert its tag in the prompt").check()
        page.get_by_label("Prompt", exact=True).fill("a cat")
        cards.filter(has_text="outline.safetensors").click()
        expect(page.get_by_label("Prompt", exact=True)).to_have_value("a cat, outline <lora:outline:1>")
        cards.filter(has_text="swap").get_by_role("button", name="make one").click()
        expect(cards.filter(has_text="swap").locator("img")).to_be_visible(timeout=60_000)
        with Image.open(examples / "swap.preview.png") as made:
            assert made.text["parameters"].startswith("swapped <lora:swap:1>")
    finally:
        for path in (examples / "zoom.png", examples / "swap.preview.png", served.folder / "wide.safetensors"):
            path.unlink(missing_ok=True)
        served.engine.rescan()


# ---- a transformer model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux_served(tmp_path_factory):
    """``--model tiny-flux`` (its example adapters adapt the transformer's attention), served at 64x64."""
    tmp = tmp_path_factory.mktemp("flux")
    engine = app.open_engine("tiny-flux", tmp / "adapters")
    demo = app.build_app(engine, slots=2, size=64, steps=2, refresh_seconds=60)
    _, url, _ = app.launch(demo, engine, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield SimpleNamespace(url=url, engine=engine)
    finally:
        demo.close()


def test_transformer_model_block_weights_and_samplers(flux_served):
    """A Flux pipeline: its family and block groups, its own (flow-matching) sampler only, and block
    weights per group: all groups at 0 switch an attention-only adapter off, one group at 0 changes it."""
    engine = flux_served.engine
    assert (engine.family, engine.denoiser, engine.samplers) == ("Flux.1", "transformer", ["Default"])
    assert engine.block_groups == {"transformer_blocks": 2, "single_transformer_blocks": 2}
    assert all(c.usable for c in engine.cards.values()) and len(engine.cards) == len(webui.EXAMPLES)
    settings = webui.GenerationSettings("a photo of sks dog", seed=3, steps=2, width=64, height=64)
    image = lambda stack, **kw: np.asarray(engine.generate(settings, stack, **kw).images[0])  # noqa: E731
    base, styled = image([]), image([webui.StackEntry("outline")])
    off = image([webui.StackEntry("outline", blocks="transformer_blocks=0; single_transformer_blocks=0")])
    single_off = engine.generate(settings, [webui.StackEntry("outline", 0.5, blocks={"single_transformer_blocks": 0})])
    assert np.abs(styled.astype(int) - base).max() > 0 and np.array_equal(off, base)
    assert "<lora:outline:0.5:blocks=single_transformer_blocks=0>" in single_off.parameters[0]
    again = engine.generate(webui.GenerationSettings(single_off.parameters[0].split("\n")[0], seed=3, steps=2,
                                                     width=64, height=64), [])
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(single_off.images[0]))  # the tag carries the blocks
    with pytest.raises(ValueError, match="block groups are transformer_blocks, single_transformer_blocks"):
        engine.generate(settings, [webui.StackEntry("outline", blocks="down=0")])
    with pytest.raises(ValueError, match="the Euler sampler does not work with this model's FlowMatchEulerDiscrete"):
        engine.generate(webui.GenerationSettings("a", steps=2, width=64, height=64, scheduler="Euler"), [])


def test_browser_transformer_model_header_and_block_weights(browser, flux_served):
    """The header names the model's family and dtype; the block weights show the transformer's groups, and
    block weights typed for a slot reach the stack (generating with them: the test above)."""
    page = open_page(browser, flux_served.url)
    try:
        expect(page.locator("#status")).to_contain_text("Model tiny-flux (family Flux.1, float32 on cpu)")
        page.get_by_text("Separate Transformer / text-encoder weights").click()
        expect(page.locator("#block-groups")).to_contain_text(
            "transformer_blocks (2 blocks), single_transformer_blocks (2 blocks)")
        pick(page, 1, "outline")
        blocks = page.get_by_label("Block weights 1")
        blocks.fill("single_transformer_blocks=0,1")
        blocks.blur()
        expect(page.locator("#stack-order").get_by_role("row").nth(1)).to_contain_text("single_transformer_blocks=0,1")
    finally:
        page.close()


def test_notes_keep_their_tags_as_text():
    """A note naming ``<lora:name:w>`` tags renders them as text, not as an autolink (issue: tags in the
    notes rendered as links with the brackets gone)."""
    text = app.notes_markdown(["a fused stack is in use for everyone: <lora:outline:1>, <lora:swap:0.5>"])
    assert "&lt;lora:outline:1&gt;" in text and "<lora:" not in text
