"""lycoris-lite web UI: load, scale, stack, fuse and unload adapters on a diffusers pipeline.

    python ui/app.py [--model tiny-world|tiny-sd|tiny-flux|…|PATH|OWNER/NAME] [--adapters DIR]
                     [--host 127.0.0.1] [--port 7860] [--auth USER:PASSWORD ...] [--admin USER ...]
                     [--allow-anonymous] [--share]
                     [--max-upload-mb 512] [--upload-quota-mb 2048] [--max-loaded 8] [--slots 4]
                     [--device cuda] [--dtype float16|bfloat16|float32]

A Gradio page over :mod:`lycoris_lite.integrations.webui`, which does the work: the adapter library, the shared
pipeline and its lock, prompt tags, PNG parameters. Each browser session keeps its own stack in
``gr.State``; every event that touches the pipeline shares one queue slot (``concurrency_id="gpu"``) and
the library's lock. On a shared server, :class:`webui.Accounts` checks logins (rate-limited) and keeps
what changes everyone's pipeline or folder to the admins. With no arguments it opens the embedded
pretrained model ``tiny-world`` and ``outputs/demo`` (where ``make demo`` trains one adapter per algorithm);
a folder with no adapter that fits a tiny model gets its example adapters (for ``tiny-world`` trained ones:
moving a weight visibly changes the picture). The page's own files (scripts, the adapter cards' template)
are in ``ui/page/``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home; must precede the import

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lycoris_lite.base.dtypes import DTYPES  # noqa: E402
from lycoris_lite.integrations import webui  # noqa: E402
from lycoris_lite.models import TINY_PIPELINES, load_pipeline  # noqa: E402

DEFAULT_ADAPTERS = Path("outputs/demo")
STACK_HEADERS = ["#", "adapter", "algorithm", "weight", "{denoiser}", "TE", "blocks"]  # TE: the text encoders
SLOT_VALUES = 6  # per stack slot: on, adapter, weight, denoiser weight, text-encoder weight, block weights
USER_ERRORS = (ValueError, OSError)  # the library's errors about the user's input (bad files included)
CANCEL_WAIT = 30.0  # seconds Cancel waits for the generation to stop before it answers
PAGE = Path(__file__).with_name("page")  # the page's own script, and the adapter cards' template, CSS and JS
ALL = "all"                                 # the filters' "no filter"
CLICK_MODES = ("Add it to the stack", "Insert its tag in the prompt")
THUMBNAIL = 192                             # pixels: the cards' preview images
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: what changes the server for everyone: with ``--admin``, the admins' alone (enabled per page load)
ADMIN_ACTIONS = ("fuse", "unfuse", "unload", "rescan", "upload", "add")


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def _username(request: gr.Request | None) -> str | None:
    return getattr(request, "username", None)


def _stack_line(stack) -> str:
    return " → ".join(f"`{e.tag()}`" for e in stack) or "no adapters"


class Handlers:
    """The page's event handlers: Gradio values in, Gradio values out, the work in ``engine``."""

    def __init__(self, engine: webui.SharedPipeline, max_upload_bytes: int, accounts: webui.Accounts | None = None,
                 quota: webui.UploadQuota | None = None, preview_settings: webui.GenerationSettings | None = None):
        self.engine, self.max_upload_bytes = engine, max_upload_bytes
        self.accounts, self.quota = accounts, quota
        self.preview_settings = preview_settings or webui.GenerationSettings(seed=0)
        self._thumbnails: dict[tuple, str] = {}

    # ---- who may ----------------------------------------------------------------------------------
    def is_admin(self, request: gr.Request | None) -> bool:
        return self.accounts is None or self.accounts.is_admin(_username(request))

    def _require_admin(self, request: gr.Request | None, action: str) -> None:
        if not self.is_admin(request):
            raise gr.Error(f"{action} changes the server for everyone: only its admins ("
                           f"{', '.join(sorted(self.accounts.admins))}) may do it", print_exception=False)

    def permissions(self, request: gr.Request = None):
        """Per page load: the buttons that change the server for everyone, enabled for admins only."""
        return (gr.update(interactive=self.is_admin(request)),) * len(ADMIN_ACTIONS)

    # ---- the adapter browser ----------------------------------------------------------------------
    def cards_view(self, query: str = "", algorithm: str = ALL, family: str = ALL) -> list[dict]:
        """The grid's cards: the adapters the search and the filters leave, previews as data URIs."""
        shown = webui.search_cards(self.engine.cards.values(), query, _chosen(algorithm), _chosen(family))
        current = {c.preview for c in self.engine.cards.values()}
        self._thumbnails = {k: v for k, v in list(self._thumbnails.items()) if k[0] in current}  # gone ones leave
        return [{"name": c.name, "location": c.location, "algorithm": c.algorithm or "?", "rank": c.rank or "",
                 "family": c.family or "unknown", "words": ", ".join(c.trigger_words), "problem": c.problem or "",
                 "preview": self._thumbnail(c.preview) if c.preview else ""} for c in shown]

    def _thumbnail(self, path: Path) -> str:
        """``path`` as a small PNG data URI ("" when it is no readable image); kept per file version."""
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in self._thumbnails:
            try:
                with Image.open(path) as image:
                    image = image.convert("RGB")
                image.thumbnail((THUMBNAIL, THUMBNAIL))
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                self._thumbnails[key] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            except (OSError, ValueError, Image.DecompressionBombError):
                self._thumbnails[key] = ""
        return self._thumbnails[key]

    def card_details(self, name: str) -> str:
        """The metadata card of adapter ``name`` (HTML, every value escaped)."""
        card = self.engine.cards.get(name)
        if card is None:
            return ""
        rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in card.summary().items())
        return f'<div class="meta-card"><h3>{html.escape(card.name)}</h3><dl>{rows}</dl></div>'

    def card_clicked(self, evt: gr.EventData, request: gr.Request, mode, prompt, query, algorithm, family, *names):
        """A click on a card: its metadata card, then (usable adapters) the adapter in the first empty slot
        or its tag and trigger words in the prompt, as ``mode`` says; the card's "make one" button makes
        its preview. ``(details, prompt, grid, *slots)``; a greyed card only shows why."""
        name, action = getattr(evt, "name", None), getattr(evt, "action", "add")
        card = self.engine.cards.get(name)
        if card is None:
            raise gr.Error(f"no adapter named {name!r} in the library (it changed: rescan)", print_exception=False)
        unchanged = (gr.skip(),) * len(names)
        details = self.card_details(name)
        if action == "preview":
            self._require_admin(request, "Making a preview")
            with _user_errors():
                self.engine.make_preview(name, self.preview_settings)
            return details, gr.skip(), self.cards_view(query, algorithm, family), *unchanged
        if not card.usable:
            gr.Warning(f"{name} cannot be used: {card.problem}")
            return details, gr.skip(), gr.skip(), *unchanged
        if mode == CLICK_MODES[1]:
            with _user_errors():
                return details, webui.insert_tag(prompt, name, card.trigger_words), gr.skip(), *unchanged
        if name in names:
            raise gr.Error(f"{name} is in the stack already (slot {names.index(name) + 1})", print_exception=False)
        if all(names):
            raise gr.Error(f"all {len(names)} slots are in use: empty one, or insert the tag in the prompt",
                           print_exception=False)
        slots = list(unchanged)
        slots[[bool(n) for n in names].index(False)] = gr.update(value=name)
        return details, gr.skip(), gr.skip(), *slots

    # ---- library ----------------------------------------------------------------------------------
    def rescan(self, request: gr.Request = None) -> str:
        self._require_admin(request, "Rescan")
        with _user_errors():
            cards = self.engine.rescan()
        return f"{len(cards)} adapters, {sum(c.usable for c in cards)} usable."

    def refresh(self, seen_version, query, algorithm, family, *names):
        """The card grid and the slots' choices (usable adapters only) when the folder changed since this
        session last looked: ``(version, grid, *dropdowns)``; nothing otherwise."""
        version = self.engine.library_version
        if seen_version == version:
            return (gr.skip(),) * (2 + len(names))
        usable = self.engine.usable_names()
        return (version, self.cards_view(query, algorithm, family),
                *[gr.Dropdown(choices=usable, value=n if n in usable else None) for n in names])

    def add_adapter(self, file, save_as, request: gr.Request = None):
        self._require_admin(request, "Adding an adapter")
        if not file:
            raise gr.Error("Choose a .safetensors file first.", print_exception=False)
        who = _username(request) or _session(request)
        with _user_errors():
            size = Path(file).stat().st_size
            if self.quota is not None:
                self.quota.check(who, size)
            card = self.engine.add_upload(file, (save_as or "").strip() or Path(file).name,
                                          max_bytes=self.max_upload_bytes)
        if self.quota is not None:
            self.quota.add(who, size)
        return f"Added **{card.name}** ({card.algorithm}, {card.rank})."

    # ---- the session's stack ----------------------------------------------------------------------
    def set_stack(self, *values):
        """``values``: per slot (on, adapter, weight, UNet or transformer weight, text-encoder weight, block
        weights); an empty UNet, text-encoder or block weight (``None`` or blank text) means the slot's
        weight. Block weights name the model's block groups (:attr:`webui.SharedPipeline.block_groups`)."""
        stack = []
        for i in range(0, len(values), SLOT_VALUES):
            on, name, weight, unet, te, blocks = values[i:i + SLOT_VALUES]
            if name:
                with _user_errors():
                    self.engine.card(name)
                    entry = webui.StackEntry(name, weight, unet=_blank_is_none(unet), text_encoder=_blank_is_none(te),
                                             enabled=on, blocks=_blank_is_none(blocks))
                    entry.pipeline_weight(self.engine.denoiser, list(self.engine.block_groups))  # groups exist
                    stack.append(entry)
        with _user_errors():
            applied = webui.effective_stack(stack, [])
        cards = self.engine.cards
        rows = [[i + 1, e.name, getattr(cards.get(e.name), "algorithm", ""), e.weight, e.unet_weight,
                 e.text_encoder_weight, webui.format_block_weights(e.blocks).replace(";", "; ") if e.blocks else ""]
                for i, e in enumerate(applied)]
        return stack, rows

    # ---- generating -------------------------------------------------------------------------------
    def generate(self, prompt, negative_prompt, seed, steps, guidance, width, height, count, sampler, stack,
                 request: gr.Request = None, progress=gr.Progress()):
        def on_step(done, total, what):
            progress((done, total), desc=what, unit="steps")

        start = time.perf_counter()
        try:
            with _user_errors():
                settings = webui.GenerationSettings(prompt or "", negative_prompt or "", seed, steps, guidance, width,
                                                    height, count, sampler)
                result = self.engine.generate(settings, stack or [], session=_session(request), on_step=on_step)
        except webui.GenerationCancelled as exc:
            return gr.skip(), gr.skip(), f"Cancelled ({exc}).", gr.skip(), gr.skip(), gr.skip()
        read = (f"read from disk: {', '.join(result.loaded_from_disk)}" if result.loaded_from_disk
                else "no disk read")
        status = (f"{len(result.images)} image(s) in {time.perf_counter() - start:.1f} s · "
                  f"{'fused stack' if result.fused else 'stack'} {_stack_line(result.stack)} · "
                  f"switched in {result.switch_seconds * 1000:.0f} ms ({read})")
        status += notes_markdown(result.notes)
        gallery = [(image, f"seed {s}") for image, s in zip(result.images, result.seeds)]
        return gallery, result.parameters[0], status, result.seeds[0], result.parameters, result.seeds

    def cancel(self, request: gr.Request = None):
        """Stop the session's generation and answer once it has stopped, as the generation itself does
        (the page may drop the cancelled generation's own answer)."""
        outcome = self.engine.cancel(_session(request), wait=CANCEL_WAIT)
        return "Nothing to cancel." if outcome is None else f"Cancelled ({outcome})."

    def select_image(self, texts, seeds, evt: gr.SelectData):
        """The selected image's parameters text and seed ("Reuse last" then takes that seed)."""
        if not texts or not 0 <= evt.index < len(texts):
            return "", gr.skip()
        return texts[evt.index], seeds[evt.index]

    # ---- global actions ---------------------------------------------------------------------------
    def fuse(self, stack, request: gr.Request = None):
        self._require_admin(request, "Fuse")
        with _user_errors():
            self.engine.fuse(stack or [])
        return self.status()

    def unfuse(self, request: gr.Request = None):
        self._require_admin(request, "Unfuse")
        with _user_errors():
            self.engine.unfuse()
        return self.status()

    def unload_all(self, request: gr.Request = None):
        self._require_admin(request, "Unload all")
        with _user_errors():
            self.engine.unload_all()
        return self.status()

    def status(self, request: gr.Request = None) -> str:
        s = self.engine.status()
        line = (f"Model **{s['model']}** (family {s['family'] or 'unknown'}, {s['dtype']} on {s['device']}) · "
                f"attached adapters {len(s['loaded'])}/{s['max_loaded']}: {', '.join(s['loaded']) or 'none'}")
        if _username(request):
            line += f" · signed in as {_username(request)}{' (admin)' if self.is_admin(request) else ''}"
        if s["fused"]:
            line += (f"\n\n**Fused for everyone:** {_stack_line(s['fused'])}. Every generation uses this stack "
                     "until someone presses Unfuse.")
        return line


def _chosen(value):
    """A filter's choice, ``None`` for :data:`ALL`."""
    return None if value in (None, "", ALL) else value


def _blank_is_none(value):
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def block_help(engine: webui.SharedPipeline) -> str:
    """The block weights' help: the model's block groups and what a value means."""
    groups = ", ".join(f"`{g}` ({n} block{'s' if n > 1 else ''})" for g, n in engine.block_groups.items())
    return (f"Block groups of this model: {groups}. Block weights multiply the slot's "
            f"{'UNet' if engine.denoiser == 'unet' else 'transformer'} weight per group: one number for the "
            "whole group or one per block (`group=0.5; other=1,0,1`); groups not named keep 1, and layers "
            "outside the blocks keep weight 1. In the prompt: `<lora:name:w:blocks=group=0.5;other=1,0>`.")


def _keep_outputs_on_error(event, outputs: list) -> None:
    """When ``event`` fails its outputs keep their values: Gradio covers them with an "Error" overlay
    until another event updates them, so an update that changes nothing follows the failure (the toast
    tells the user what went wrong)."""
    unchanged = gr.skip() if len(outputs) == 1 else (gr.skip(),) * len(outputs)
    event.failure(lambda: unchanged, None, outputs, api_visibility="private",
                  concurrency_limit=None, show_progress="hidden")


def notes_markdown(notes) -> str:
    """The engine's notes as Markdown paragraphs, ``<`` and ``&`` escaped: a ``<lora:name:w>`` tag in a note
    would otherwise render as an autolink, brackets gone."""
    return "".join(f"\n\n{html.escape(note, quote=False)}" for note in notes)


@contextmanager
def _user_errors():
    """The library's errors about the user's input become messages on the page (the app goes on)."""
    try:
        yield
    except USER_ERRORS as exc:
        raise gr.Error(str(exc), print_exception=False) from None


def build_app(engine: webui.SharedPipeline, *, slots: int = 4, max_upload_bytes: int = 512 * 2**20,
              size: int = 512, steps: int = 20, accounts: webui.Accounts | None = None,
              upload_quota_bytes: int | None = None, refresh_seconds: float = 3.0) -> gr.Blocks:
    """The page. Public API endpoints (``/set_stack``, ``/generate``, ``/cancel``, ``/fuse``, ``/unfuse``,
    ``/unload``, ``/rescan``, ``/add_adapter``) go through the queue only (``api_open=False``). With
    ``accounts`` that name admins, the actions of :data:`ADMIN_ACTIONS` are theirs alone. The status
    line and the library follow other sessions' changes every ``refresh_seconds``."""
    quota = webui.UploadQuota(upload_quota_bytes) if upload_quota_bytes is not None else None
    preview = webui.GenerationSettings(seed=0, steps=steps, width=size, height=size)
    h = Handlers(engine, max_upload_bytes, accounts, quota, preview)
    denoiser = "UNet" if engine.denoiser == "unet" else "Transformer"
    gpu = {"concurrency_id": "gpu", "concurrency_limit": 1}
    free = {"concurrency_limit": None}
    private = {"api_visibility": "private", "concurrency_limit": None, "show_progress": "hidden"}
    with gr.Blocks(title="lycoris-lite", analytics_enabled=False, delete_cache=(3600, 7200)) as demo:
        stack, last_seed, texts, seeds, seen = gr.State([]), gr.State(-1), gr.State([]), gr.State([]), gr.State(-1)
        status = gr.Markdown(h.status, elem_id="status")  # a callable: fresh on every page load
        with gr.Accordion("Adapters", open=True, elem_id="adapter-browser"):
            with gr.Row(equal_height=True):
                search = gr.Textbox(label="Search", placeholder="name, trigger words, metadata", scale=3,
                                    elem_id="adapter-search")
                algorithm = gr.Dropdown([ALL, *webui.algorithm_names()], value=ALL, label="Algorithm", scale=1,
                                        elem_id="algorithm-filter")
                family = gr.Dropdown([ALL, *webui.FAMILIES], value=ALL, label="Family", scale=1,
                                     elem_id="family-filter")
                click_mode = gr.Radio(list(CLICK_MODES), value=CLICK_MODES[0], label="A click on a card", scale=2,
                                      elem_id="click-mode")
            with gr.Row():
                grid = gr.HTML(h.cards_view(), html_template=(PAGE / "adapter_cards.html").read_text(),
                               css_template=(PAGE / "adapter_cards.css").read_text(),
                               js_on_load=(PAGE / "adapter_cards.js").read_text(), elem_id="adapter-grid",
                               max_height=480, scale=3)
                with gr.Column(scale=1, min_width=300):
                    details = gr.HTML("<p>Click a card: its metadata shows here.</p>", elem_id="adapter-details")
                    upload = gr.File(label="Add an adapter (.safetensors)", file_types=[".safetensors"],
                                     type="filepath", elem_id="upload", height=120)
                    save_as = gr.Textbox(label="Save as", placeholder="name.safetensors", elem_id="save-as",
                                         info="empty: the uploaded file's name")
                    with gr.Row():
                        add = gr.Button("Add to library", variant="primary")
                        rescan = gr.Button("Rescan folder")
                    upload_message = gr.Markdown(elem_id="upload-message")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    placeholder="a red circle on a green background, outline <lora:outline:0.8>")
                negative = gr.Textbox(label="Negative prompt", lines=1)
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                with gr.Accordion("Settings", open=True):
                    with gr.Row():
                        seed = gr.Number(-1, label="Seed", precision=0, info="-1: random", minimum=-1,
                                         maximum=webui.MAX_SEED)
                        randomise = gr.Button("Random", scale=0, min_width=80)
                        reuse = gr.Button("Reuse last", scale=0, min_width=80)
                        sampler = gr.Dropdown(engine.samplers,
                                              value=webui.DEFAULT_SCHEDULER, label="Sampler")
                    with gr.Row():
                        n_steps = gr.Slider(1, 150, value=steps, step=1, label="Steps")
                        guidance = gr.Slider(0, 30, value=7, step=0.5, label="CFG scale")
                    with gr.Row():
                        width = gr.Slider(8, 2048, value=size, step=8, label="Width")
                        height = gr.Slider(8, 2048, value=size, step=8, label="Height")
                        count = gr.Slider(1, 8, value=1, step=1, label="Images")
                gr.Markdown("### Stack\nApplied top to bottom (that is the composition order). "
                            "`<lora:name:w>` or `<lora:name:te:unet>` in the prompt adds to it.")
                rows, splits = [], []
                for i in range(1, slots + 1):
                    with gr.Group():  # the adapter's name gets the whole width: long names stay readable
                        name = gr.Dropdown(engine.usable_names(), value=None, label=f"Adapter {i}",
                                           allow_custom_value=True)
                        with gr.Row(equal_height=True):
                            on = gr.Checkbox(True, label=f"On {i}", scale=0, min_width=80)
                            weight = gr.Slider(-2, 2, value=1.0, step=0.05, label=f"Weight {i}", scale=1)
                        rows.append((on, name, weight))
                with gr.Accordion(f"Separate {denoiser} / text-encoder weights, block weights (empty: the slot's "
                                  "weight)", open=False, elem_id="split-weights"):
                    gr.Markdown(block_help(engine), elem_id="block-groups")
                    for i in range(1, slots + 1):
                        with gr.Row():  # text, not gr.Number: a Number sends 0 for an empty field
                            splits.append((gr.Textbox(label=f"{denoiser} weight {i}", placeholder="the slot's weight"),
                                           gr.Textbox(label=f"Text-encoder weight {i}",
                                                      placeholder="the slot's weight"),
                                           gr.Textbox(label=f"Block weights {i}", scale=2, placeholder="; ".join(
                                               f"{g}=1" for g in engine.block_groups))))
                slot_inputs = [c for row, split in zip(rows, splits) for c in (*row, *split)]
                slot_names = [row[1] for row in rows]
                order = gr.Dataframe(headers=[h.format(denoiser=denoiser) for h in STACK_HEADERS], label="Stack order",
                                     interactive=False, wrap=True, elem_id="stack-order",
                                     column_widths=["6%", "20%", "14%", "13%", "11%", "8%", "28%"])
                with gr.Row():
                    fuse = gr.Button("Fuse stack")
                    unfuse = gr.Button("Unfuse")
                    unload = gr.Button("Unload all")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Images", format="png", columns=2, elem_id="result-gallery",
                                     buttons=["download", "fullscreen"])
                parameters = gr.Textbox(label="Parameters (PNG text)", lines=4, elem_id="parameters")
                message = gr.Markdown(elem_id="message")
        set_stack = gr.on([c.change for c in slot_inputs], h.set_stack, slot_inputs, [stack, order],
                          api_name="set_stack", trigger_mode="always_last", **free)
        read_stack = run.click(h.set_stack, slot_inputs, [stack, order], **private)
        generation = read_stack.success(
            h.generate, [prompt, negative, seed, n_steps, guidance, width, height, count, sampler, stack],
            [gallery, parameters, message, last_seed, texts, seeds], api_name="generate", **gpu)
        generation.then(h.status, None, status, **private)
        stop.click(h.cancel, None, message, cancels=[generation], api_name="cancel", **free)
        randomise.click(lambda: -1, None, seed, **private)
        reuse.click(lambda s: s, last_seed, seed, **private)
        gallery.select(h.select_image, [texts, seeds], [parameters, last_seed], **private)
        read_for_fuse = fuse.click(h.set_stack, slot_inputs, [stack, order], **private)
        fusing = read_for_fuse.success(h.fuse, stack, status, api_name="fuse", **gpu)
        unfusing = unfuse.click(h.unfuse, None, status, api_name="unfuse", **gpu)
        unloading = unload.click(h.unload_all, None, status, api_name="unload", **gpu)
        refresh = ([seen, search, algorithm, family, *slot_names], [seen, grid, *slot_names])
        rescanning = rescan.click(h.rescan, None, upload_message, api_name="rescan", **gpu)
        rescanning.success(h.refresh, *refresh, **private)
        adding = add.click(h.add_adapter, [upload, save_as], upload_message, api_name="add_adapter", **gpu)
        adding.success(h.refresh, *refresh, **private)
        gr.on([search.change, algorithm.change, family.change], h.cards_view, [search, algorithm, family], grid,
              trigger_mode="always_last", **private)
        clicked = grid.click(h.card_clicked, [click_mode, prompt, search, algorithm, family, *slot_names],
                             [details, prompt, grid, *slot_names], **private)
        for event, outputs in ((set_stack, [order]), (read_stack, [order]), (read_for_fuse, [order]),
                               (generation, [gallery, parameters, message]), (fusing, [status]),
                               (unfusing, [status]), (unloading, [status]), (rescanning, [upload_message]),
                               (adding, [upload_message]), (clicked, [details, prompt, grid])):
            _keep_outputs_on_error(event, outputs)
        demo.load(h.refresh, *refresh, **private)
        demo.load(h.permissions, None, [fuse, unfuse, unload, rescan, upload, add], **private)
        timer = gr.Timer(refresh_seconds)
        timer.tick(h.status, None, status, **private)
        timer.tick(h.refresh, *refresh, **private)  # another session's upload shows up here too
    demo.queue(max_size=64, api_open=False)
    return demo


def launch(demo: gr.Blocks, engine: webui.SharedPipeline, *, host: str = "127.0.0.1", port: int | None = 7860,
           auth: webui.Accounts | None = None, share: bool = False, max_upload_bytes: int = 512 * 2**20,
           prevent_thread_lock: bool = False, quiet: bool = False, show_error: bool = False):
    """Serve ``demo`` with the security settings: the adapters folder is blocked from serving, uploads
    are capped, monitoring, the API page and MCP are off, and no share link unless asked."""
    return demo.launch(server_name=host, server_port=port, auth=auth, share=share, max_file_size=max_upload_bytes,
                       blocked_paths=[str(engine.library.folder)], enable_monitoring=False, mcp_server=False,
                       footer_links=["gradio", "settings"], ssr_mode=False, strict_cors=True, quiet=quiet,
                       head=f"<script>{(PAGE / 'plain_toasts.js').read_text()}</script>",
                       css=(PAGE / "page.css").read_text(),
                       show_error=show_error, prevent_thread_lock=prevent_thread_lock)


def parse_logins(texts) -> dict[str, str]:
    """``["USER:PASSWORD", …]`` as ``{user: password}`` (the password may hold colons)."""
    logins = {}
    for text in texts or []:
        user, sep, password = text.partition(":")
        if not sep or not user or not password:
            raise SystemExit("--auth takes USER:PASSWORD")
        if user in logins:
            raise SystemExit(f"--auth names {user!r} twice")
        logins[user] = password
    return logins


def accounts_from_args(args: argparse.Namespace) -> webui.Accounts | None:
    """The server's logins and admins, or ``SystemExit`` for a setup that would expose it: a non-loopback
    address or a share link without ``--auth`` needs ``--allow-anonymous``; ``--admin`` needs logins."""
    logins = parse_logins(args.auth)
    if not logins:
        if args.admin:
            raise SystemExit("--admin needs --auth: admins are users who log in")
        if (args.share or args.host not in LOOPBACK) and not args.allow_anonymous:
            where = "a public share link" if args.share else args.host
            raise SystemExit(f"refusing to serve on {where} without --auth: anyone who can reach it could use it. "
                             "Add --auth USER:PASSWORD, or --allow-anonymous if that is what you want.")
        return None
    try:
        return webui.Accounts(logins, args.admin or ())
    except ValueError as exc:
        raise SystemExit(f"--admin: {exc}") from None


def _device_type(device: str | None) -> str:
    """Where the pipeline runs: ``--device``'s type, else the CPU (where ``load_pipeline`` leaves it)."""
    return torch.device(device).type if device else "cpu"


def default_dtype(device: str | None) -> torch.dtype:
    """float16 where the pipeline runs on CUDA, float32 elsewhere (the CPU's fast dtype)."""
    return torch.float16 if _device_type(device) == "cuda" else torch.float32


def open_engine(model: str, adapters: Path, *, max_loaded: int = 8, examples: bool = True,
                device: str | None = None, dtype: torch.dtype | None = None) -> webui.SharedPipeline:
    """Load ``model`` in ``dtype`` (diffusers' ``torch_dtype``; the tiny model is cast) and the adapters
    folder. For a tiny model, a folder none of whose adapters fits it gets the example adapters, in
    ``examples/`` (``examples-<model>/`` when ``examples/`` is taken, e.g. by another tiny model's).
    Adapters loaded later follow the library's rule for the layers' dtype."""
    pipe = load_pipeline(model, torch_dtype=dtype)
    if device:
        pipe = pipe.to(device)
    library = webui.AdapterLibrary(adapters)
    name = model if model in TINY_PIPELINES or not os.path.isdir(model) else Path(model).resolve().name
    engine = webui.SharedPipeline(pipe, library, name, max_loaded=max_loaded)
    if examples and model in TINY_PIPELINES and not any(card.usable for card in engine.cards.values()):
        destination = library.folder / "examples"
        if destination.exists():
            destination = library.folder / f"examples-{model}"
        webui.write_example_adapters(pipe, destination, model_name=model)
        engine.rescan()
    return engine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``device`` defaults to CUDA when there is one, and ``dtype`` comes back as a
    ``torch.dtype`` (:func:`default_dtype` when not given).
    float16 on the CPU is allowed with a warning."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-world",
                        help=f"a diffusers folder or hub id (UNet or transformer pipelines: SD, SDXL, Flux, SD3, …), "
                             f"or an embedded tiny model: {', '.join(TINY_PIPELINES)}")
    parser.add_argument("--adapters", type=Path, default=DEFAULT_ADAPTERS, help="the adapters folder (subfolders too)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", action="append",
                        help="USER:PASSWORD required to open the page; repeat for several users (default: "
                             "$LYCORIS_UI_AUTH, one per line, hidden from ps); 5 wrong passwords in a minute "
                             "lock that user out for the minute")
    parser.add_argument("--admin", action="append",
                        help="a user (of --auth) who may fuse, unfuse, unload all, rescan and upload; repeat for "
                             "several (default: every user may)")
    parser.add_argument("--allow-anonymous", action="store_true",
                        help="serve a non-loopback --host or --share without --auth (refused otherwise)")
    parser.add_argument("--upload-quota-mb", type=float, default=2048, help="uploads per session (or user)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--max-upload-mb", type=float, default=512, help="largest adapter upload")
    parser.add_argument("--max-loaded", type=int, default=8, help="adapters kept attached (least recently used leave)")
    parser.add_argument("--slots", type=int, default=4, help="stack rows on the page")
    parser.add_argument("--device", help="e.g. cuda, cpu (default: cuda when there is one, else the CPU)")
    parser.add_argument("--dtype", choices=list(DTYPES),
                        help="the pipeline's dtype (default: float16 with --device cuda, float32 otherwise)")
    parser.add_argument("--no-examples", action="store_true", help="never write the example adapters")
    args = parser.parse_args(argv)
    if args.auth is None and os.environ.get("LYCORIS_UI_AUTH"):
        args.auth = os.environ["LYCORIS_UI_AUTH"].splitlines()
    if args.device is None and torch.cuda.is_available():
        args.device = "cuda"
    args.dtype = DTYPES[args.dtype] if args.dtype else default_dtype(args.device)
    if args.dtype == torch.float16 and _device_type(args.device) == "cpu":
        print("warning: float16 on the CPU is slow and some operations may not support it; "
              "bfloat16 or float32 suit the CPU better", file=sys.stderr)
    return args


def main(argv: list[str] | None = None, *, block: bool = True):
    """Parse the command line and serve; with ``block=False`` return ``(demo, url)`` at once (tests)."""
    args = parse_args(argv)
    accounts = accounts_from_args(args)
    if accounts is None and args.host not in LOOPBACK:
        print(f"warning: serving on {args.host} without --auth (--allow-anonymous): anyone who can reach it can "
              "use it", file=sys.stderr)
    engine = open_engine(args.model, args.adapters, max_loaded=args.max_loaded, examples=not args.no_examples,
                         device=args.device, dtype=args.dtype)
    max_bytes = int(args.max_upload_mb * 2**20)
    size = engine.default_size
    demo = build_app(engine, slots=args.slots, max_upload_bytes=max_bytes, size=size, accounts=accounts,
                     upload_quota_bytes=int(args.upload_quota_mb * 2**20))
    _, url, _ = launch(demo, engine, host=args.host, port=args.port, auth=accounts, share=args.share,
                       max_upload_bytes=max_bytes, prevent_thread_lock=not block)
    return demo, url


if __name__ == "__main__":
    main()
