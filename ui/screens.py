"""Screenshots of the web UI's main states, for a person to look at: ``make ui-screens``.

    python ui/screens.py [--out outputs/ui-screens]

Serves ``ui/app.py`` on the pretrained tiny model ``tiny-world`` with its trained example adapters (in a
temporary folder, previews made for them) and, for the transformer view, on ``tiny-flux``; drives them in
headless Chromium (Debian's ``chromium``) and writes one PNG per state into ``--out``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

import app  # ui/app.py, beside this file

#: the world caption the tiny-world states draw (CFG 3 and 4 images are set on the page)
PROMPT = "a red circle on a green background"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def _serve(model: str, folder: Path, **build):
    engine = app.open_engine(model, folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.build_app(engine, **build)
    _, url, _ = app.launch(demo, engine, port=port, prevent_thread_lock=True, quiet=True)
    return engine, demo, url


def sd_states(page, out: Path) -> None:
    """The tiny-world model: the grid, a search with a card's metadata, one example at weight 0 and at
    weight 1 (four seeds each), a stack of two and its images, the split and block weights, an error toast."""
    page.screenshot(path=str(out / "01-start.png"), full_page=True)
    page.get_by_label("Search").fill("swapped")
    page.locator(".adapter-card").first.click()                   # swap into the first slot
    expect(page.locator("#adapter-details")).to_contain_text("Trigger words")
    page.screenshot(path=str(out / "02-search-and-metadata.png"))
    page.get_by_label("Prompt", exact=True).fill(f"{PROMPT}, swapped")
    page.get_by_label("Seed", exact=True).fill("0")
    _set_number(page, "CFG scale", 3)
    _set_number(page, "Images", 4)
    for weight, name in ((0, "03-weight-0.png"), (1, "04-weight-1.png")):
        _set_number(page, "Weight 1", weight)
        page.get_by_role("button", name="Generate").click()
        tags = f" <lora:swap:{weight}>" if weight else ""        # a weight-0 adapter is left out of the text
        expect(page.locator("#parameters textarea")).to_have_value(re.compile(f"^{PROMPT}, swapped{tags}\nSteps"),
                                                                   timeout=120_000)
        page.screenshot(path=str(out / name), full_page=True)
    page.get_by_label("Search").fill("")
    page.locator(".adapter-card").filter(has_text="outline.safetensors").click()
    page.get_by_label("Prompt", exact=True).fill(f"{PROMPT}, swapped, outline")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#parameters textarea")).to_have_value(re.compile("<lora:swap:1> <lora:outline:1>"),
                                                               timeout=120_000)
    page.screenshot(path=str(out / "05-stack-and-images.png"), full_page=True)
    page.get_by_text("Separate UNet / text-encoder weights").click()
    page.get_by_label("Block weights 1").fill("down=1; mid=0.5; up=1,0.5,0")
    page.get_by_label("Block weights 1").blur()
    expect(page.locator("#stack-order")).to_contain_text("up=1,0.5,0")
    page.locator("#split-weights").screenshot(path=str(out / "06-split-and-block-weights.png"))
    page.get_by_label("Prompt", exact=True).fill("a photo <lora:outline:abc>")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_test_id("toast-text").first).to_contain_text("<lora:outline:abc>", timeout=60_000)
    page.screenshot(path=str(out / "07-error-toast.png"))


def _set_number(page, label: str, value) -> None:
    box = page.get_by_label(f"number input for {label}")
    box.fill(str(value))
    box.press("Enter")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/ui-screens"))
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("Chromium is not installed (`make chromium` installs Debian's where it can)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
        engine, demo, url = _serve("tiny-world", Path(tmp) / "world", size=32, steps=20)
        try:
            preview = app.webui.GenerationSettings(seed=0, steps=20, guidance=3, width=32, height=32)
            for name in [n for n in engine.cards if n != "snow"]:  # one card left without a preview
                engine.make_preview(name, preview)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            expect(page.locator(".adapter-card img")).to_have_count(len(engine.cards) - 1)
            sd_states(page, args.out)
        finally:
            demo.close()
        engine, demo, url = _serve("tiny-flux", Path(tmp) / "flux", size=64, steps=2)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            page.get_by_text("Separate Transformer / text-encoder weights").click()
            expect(page.locator("#block-groups")).to_contain_text("single_transformer_blocks")
            page.screenshot(path=str(args.out / "08-transformer-model.png"), full_page=True)
        finally:
            demo.close()
        browser.close()
    print(f"screenshots in {args.out}: {', '.join(sorted(p.name for p in args.out.glob('*.png')))}")


if __name__ == "__main__":
    main()
