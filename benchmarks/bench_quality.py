"""DreamBooth quality per algorithm: subject fidelity, prompt fidelity and diversity (issue 24).

The protocol of the DreamBooth paper (Ruiz et al., CVPR 2023, §4.1), which the OFT (Qiu et al. 2023),
BOFT (Liu et al. 2024) and HRA (Yuan et al. 2024) papers reuse: fine-tune one adapter per subject, render
prompts that put the subject in new contexts or change one of its properties, and score

* **subject fidelity**: DINO (ViT-S/16 CLS token) and CLIP-I (CLIP image embedding): the mean cosine
  similarity between generated images and the real photos of the subject;
* **prompt fidelity**: CLIP-T, the mean cosine between a generated image and its prompt;
* **diversity**: DIV, the mean pairwise distance (DreamBooth: LPIPS) between images of one prompt.

On ``tiny-world`` (the embedded pretrained model, :mod:`lycoris_lite.models.world_model`; 32×32 images)
the protocol is rebuilt with the world's own instruments (:mod:`lycoris_lite.models.world`), which read
an image exactly instead of through a learned embedding:

* subject similarity (the DINO analogue): :func:`~lycoris_lite.models.world.subject_similarity` of each
  image of ``"a photo of sks duck"`` to the instance photos resized to 32 px (Lanczos, as the trainer
  resizes them), averaged over images; **duck detected**: the fraction of those images that
  :func:`~lycoris_lite.models.world.subject_detected` calls the duck (nearer a photo, or a photo repainted
  on the image's background, than any of 3000 world scenes in colour layout);
* prompt fidelity, with :func:`~lycoris_lite.models.world.detect` reading the image back:
  *background* (``"a photo of sks duck on a {bg} background"``, every world background: the background
  read back), *duck kept* (same images: background right **and** the duck detected on it), *colour*
  (``"a photo of a {colour} sks duck"``, every object colour but the subject's: the object's colour),
  *position* (``"a photo of sks duck at the {left,right,top,bottom}"``: the object's position);
  *world captions*: held-out world captions with a position (``"a red circle at the left on a blue
  background"``) drawn with the adapter on, scored as :func:`~lycoris_lite.models.world_model.caption_accuracy`
  (shape, colour and background right): what the model still draws of its world (language drift, what
  prior preservation protects);
* diversity over the images of ``"a photo of sks duck"``: **DIV-a**, the mean pairwise ``1 − cos`` of
  their :func:`~lycoris_lite.models.world.appearance` vectors (an image with no object has the zero vector,
  cosine 0 to everything), and **DIV-px**, the mean pairwise mean absolute pixel difference (RGB in
  [0, 1]).

Rows: ``base (no adapter)`` on the same prompts; every algorithm of the registry (``lycoris_lite.ALGORITHMS``)
at one trainable-parameter budget on the same targets (:data:`BUDGETS`; the trainer's own count is in the
table), equal steps and learning rate, each trained with several seeds (mean ± sample standard deviation
over the training seeds); ``instance photos (leave-one-out)``: each photo scored against the others (the
papers' "real images" row); ``base on world captions``: the base model's background, colour and position
accuracy on held-out world captions (the same kinds of request in the words it was trained on).
``--prior-algos`` adds rows trained with prior preservation.

Training is the DreamBooth trainer (``pipelines/train_dreambooth.py --config samples/dreambooth_<algo>.toml``
plus overrides) in subprocesses, ``--jobs`` at a time, one torch thread each; this process renders and
scores each adapter as soon as it is written (one pipeline, ``load_adapter`` / ``unload_adapters``).
Every image has a fixed generator seed per (prompt, index), the same for the base and every adapter.
The tiny-world folder (``--world-dir``) is copied into ``--out`` first and everything reads the copy; the
table names the weights by the sha256 of the UNet file (first 12 hex digits).

    python benchmarks/bench_quality.py                          # tiny-world, every algorithm, 3 seeds
    python benchmarks/bench_quality.py --quick                  # smoke run (2 algorithms, 1 seed)
    python benchmarks/bench_quality.py --json q.json --markdown q.md --prior-algos lora

With a real model the world's instruments do not apply; give feature models (offline folders) for the
papers' metrics, over the 25 object prompts of the DreamBooth dataset (:data:`DREAMBOOTH_PROMPTS`):

    python benchmarks/bench_quality.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --clip openai/clip-vit-base-patch32 --dino facebook/dino-vits16 --instance-dir DIR \\
        --instance-prompt "a photo of sks dog" --class-noun dog --resolution 512 --device cuda --jobs 1

``--clip``: a transformers ``CLIPModel`` + ``CLIPProcessor`` folder (CLIP-I, CLIP-T); ``--dino``: a ViT
for ``AutoModel`` + ``AutoImageProcessor`` (DINO: CLS-token cosine). Both also work on tiny-world.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lycoris_lite  # noqa: E402
from lycoris_lite.integrations.training.data import image_files  # noqa: E402
from lycoris_lite.integrations.training.options import to_argv  # noqa: E402
from lycoris_lite.models import TINY_WORLD_DIR, TINY_WORLD_NAME, load_pipeline, world  # noqa: E402
from lycoris_lite.models.world_model import held_out_scenes, image_grid  # noqa: E402

TRAINER = ROOT / "pipelines" / "train_dreambooth.py"
SAMPLES = ROOT / "samples"

#: trainer options per algorithm at one trainable-parameter budget on the same targets. ``tiny-world``
#: (``unet-full``, 79 layers): LoRA r4 and LoHa r2 72,832; LoKr r8 factor 3 75,716; OFT block 16, BOFT
#: block 8 × 2 factors and HRA 16 reflections (output side, OFT's side) 74,240. ``real``: the SD-1.5 sizes
#: of bench_dreambooth.py (LoRA r16 …); their counts differ more, and the table prints them.
BUDGETS = {
    "tiny-world": {"lora": {"rank": 4, "alpha": 4}, "loha": {"rank": 2, "alpha": 2},
                   "lokr": {"rank": 8, "alpha": 8, "factor": 3}, "oft": {"block_size": 16},
                   "boft": {"block_size": 8, "butterfly_factor": 2},
                   "hra": {"rank": 16, "rotation_side": "output"}},
    "real": {"lora": {"rank": 16, "alpha": 16}, "loha": {"rank": 8, "alpha": 8}, "lokr": {"rank": 8, "alpha": 8},
             "oft": {"block_size": 32}, "boft": {"block_size": 8, "butterfly_factor": 2}, "hra": {"rank": 8}},
}

#: the object prompts of the DreamBooth dataset (``prompts_and_classes.txt``); ``{}`` is "sks dog": 20
#: recontextualizations, then 5 property modifications
DREAMBOOTH_PROMPTS = (
    "a {} in the jungle", "a {} in the snow", "a {} on the beach", "a {} on a cobblestone street",
    "a {} on top of pink fabric", "a {} on top of a wooden floor", "a {} with a city in the background",
    "a {} with a mountain in the background", "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest", "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background", "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water", "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it", "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street", "a {} on top of a dirt road", "a {} on top of a white rug",
    "a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}",
)
#: the side positions of the world (its "center" is where an unplaced subject lands anyway)
POSITIONS = ("left", "right", "top", "bottom")
#: kinds of prompt whose images must show the subject itself (subject fidelity is scored on them)
SUBJECT_KINDS = ("subject", "background", "recontext")
#: kinds of prompt that ask for something the image should show (CLIP-T is scored on them)
REQUEST_KINDS = ("background", "colour", "position", "recontext", "property")


# ---- what is rendered ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prompt:
    """One prompt to render ``count`` times: ``kind`` says how it is scored, ``expected`` what the world's
    detector should read (a background, colour or position name, or the :class:`~world.Scene` of a
    world caption)."""

    text: str
    kind: str
    count: int
    expected: object = None


def world_prompts(args, subject_colour: str) -> list[Prompt]:
    """The tiny-world prompt set (module docstring): the subject prompt ``args.subject_images`` times, each
    background, colour (but ``subject_colour``) and position prompt ``args.images_per_prompt`` times, and
    ``args.world_captions`` held-out world captions with a side position, once each."""
    subject, n = args.instance_prompt, args.images_per_prompt
    named = f"{args.identifier} {args.class_noun}"
    captions = [replace(s, mention_position=True) for s in held_out_scenes(4 * args.world_captions)
                if s.position != "center"][: args.world_captions]
    return ([Prompt(subject, "subject", args.subject_images)]
            + [Prompt(f"{subject} on a {bg} background", "background", n, bg) for bg in world.BACKGROUNDS]
            + [Prompt(f"a photo of a {c} {named}", "colour", n, c) for c in world.OBJECT_COLOURS if c != subject_colour]
            + [Prompt(f"{subject} at the {p}", "position", n, p) for p in POSITIONS]
            + [Prompt(s.caption, "world", 1, s) for s in captions])


def real_prompts(args) -> list[Prompt]:
    """For a real model: the subject prompt, then the DreamBooth dataset's 20 recontextualization and 5
    property prompts, ``args.images_per_prompt`` images each (DreamBooth: 4)."""
    named = f"{args.identifier} {args.class_noun}"
    return [Prompt(args.instance_prompt, "subject", args.subject_images)] + [
        Prompt(p.format(named), "recontext" if i < 20 else "property", args.images_per_prompt)
        for i, p in enumerate(DREAMBOOTH_PROMPTS)]


def render(pipe, prompts: list[Prompt], args) -> list[Image.Image]:
    """Every prompt's images in prompt order, ``args.batch`` at a time; image ``i`` of prompt ``k`` uses a
    generator seeded ``1000·k + i``, whatever the model, so the base and each adapter draw from the same
    noise."""
    jobs = [(p.text, 1000 * k + i) for k, p in enumerate(prompts) for i in range(p.count)]
    images = []
    for start in range(0, len(jobs), args.batch):
        chunk = jobs[start:start + args.batch]
        images += pipe([text for text, _ in chunk], num_inference_steps=args.inference_steps,
                       guidance_scale=args.guidance, height=args.resolution, width=args.resolution,
                       generator=[torch.Generator().manual_seed(seed) for _, seed in chunk]).images
    return images


def by_kind(prompts: list[Prompt], images: list) -> dict[str, list[tuple[Prompt, Image.Image]]]:
    """``{kind: [(prompt, image), …]}`` for the flat image list of :func:`render`."""
    groups: dict[str, list] = {}
    flat = [p for p in prompts for _ in range(p.count)]
    for prompt, image in zip(flat, images, strict=True):
        groups.setdefault(prompt.kind, []).append((prompt, image))
    return groups


# ---- the world's measures -----------------------------------------------------------------------------

def load_references(folder: Path, resolution: int) -> list[Image.Image]:
    """The instance photos (the trainer's image files) resized to ``resolution`` (Lanczos)."""
    return [Image.open(p).convert("RGB").resize((resolution, resolution), Image.LANCZOS)
            for p in image_files(folder)]


def leave_one_out(references: list[Image.Image]) -> np.ndarray:
    """Subject similarity of each reference to every other reference."""
    return np.array([world.subject_similarity([im], references[:i] + references[i + 1:])[0]
                     for i, im in enumerate(references)])


def subject_colour(references: list[Image.Image]) -> str:
    """The colour :func:`world.detect` reads most often on the instance photos (the duck: yellow)."""
    return Counter(world.detect(r).colour for r in references).most_common(1)[0][0]


def mean_pairwise(values: np.ndarray, distance) -> float:
    """Mean of ``distance(values[i], values[j])`` over pairs ``i < j`` (NaN for fewer than 2)."""
    pairs = [distance(values[i], values[j]) for i in range(len(values)) for j in range(i + 1, len(values))]
    return float(np.mean(pairs)) if pairs else float("nan")


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``1 − cos(a, b)``; a zero vector has cosine 0 to everything."""
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return 1.0 - (float(a @ b) / norm if norm > 0 else 0.0)


def diversity(images: list[Image.Image], appearance: bool) -> dict[str, float]:
    """``div_px``: mean pairwise mean |a − b| of the RGB pixels in [0, 1]; with ``appearance`` (tiny-world)
    also ``div_a``: mean pairwise ``1 − cos`` of their :func:`world.appearance` vectors."""
    pixels = np.stack([np.asarray(im.convert("RGB"), np.float32) / 255 for im in images])
    scores = {"div_px": mean_pairwise(pixels, lambda a, b: float(np.abs(a - b).mean()))}
    if appearance:
        scores["div_a"] = mean_pairwise(np.stack([world.appearance(im) for im in images]), cosine_distance)
    return scores


def world_scores(groups: dict, references: list[Image.Image]) -> dict[str, float]:
    """The tiny-world columns (module docstring) from :func:`by_kind`'s groups; each a fraction or a
    similarity in [0, 1]."""
    scores = {}
    if "subject" in groups:
        subject = [im for _, im in groups["subject"]]
        similarity = world.subject_similarity(subject, references)
        detected = world.subject_detected(subject, references)
        scores.update(subject=float(similarity.mean()), detected=float(detected.mean()))
    if "background" in groups:
        read = [(world.detect(im), p) for p, im in groups["background"]]
        right = np.array([d.background == p.expected for d, p in read])
        kept = world.subject_detected([im for _, im in groups["background"]], references)
        scores.update(background=float(right.mean()), kept=float((right & kept).mean()))
    for kind, field in (("colour", "colour"), ("position", "position")):
        if kind in groups:
            scores[kind] = float(np.mean([getattr(world.detect(im), field) == p.expected for p, im in groups[kind]]))
    if "world" in groups:
        scores["world"] = float(np.mean([world.detect(im).matches(p.expected) for p, im in groups["world"]]))
    return scores


def world_caption_reference(groups: dict) -> dict[str, float]:
    """The base model on held-out world captions with a position: how often it draws the captioned
    background, object colour and position (the ``base on world captions`` row)."""
    pairs = [(world.detect(im), p.expected) for p, im in groups["world"]]
    return {"background": float(np.mean([d.background == s.background for d, s in pairs])),
            "colour": float(np.mean([d.colour == s.colour for d, s in pairs])),
            "position": float(np.mean([d.position == s.position for d, s in pairs])),
            "world": float(np.mean([d.matches(s) for d, s in pairs]))}


# ---- the papers' feature models (CLIP, DINO) ---------------------------------------------------------

def _unit(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=-1)


def _pooled(output) -> torch.Tensor:
    """A transformers ``get_*_features`` result: a tensor (transformers 4) or an output whose
    ``pooler_output`` is the projected embedding (transformers 5)."""
    return output if torch.is_tensor(output) else output.pooler_output


class ClipScorer:
    """CLIP-I and CLIP-T (DreamBooth §4.1) with a transformers ``CLIPModel``/``CLIPProcessor`` folder.

    ``image_features``/``text_features``: unit embeddings, N×D. CLIP-I is the mean cosine between each
    generated image and each reference photo; CLIP-T the mean cosine between an image and its prompt with
    the identifier token removed (``"a photo of sks duck on a red background"`` → ``"a photo of duck on a
    red background"``: the rare token means nothing to CLIP)."""

    def __init__(self, path: str, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.device = device
        self.model = CLIPModel.from_pretrained(path).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(path)

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        return _unit(_pooled(self.model.get_image_features(pixel_values=inputs["pixel_values"])))

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        return _unit(_pooled(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                          attention_mask=inputs["attention_mask"])))


class DinoScorer:
    """DINO (DreamBooth §4.1): the CLS token of a self-supervised ViT (``facebook/dino-vits16``) through
    transformers ``AutoModel``/``AutoImageProcessor``; ``image_features``: unit CLS tokens, N×D."""

    def __init__(self, path: str, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel

        self.device = device
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(path)

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        return _unit(self.model(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0])


def without_identifier(text: str, identifier: str) -> str:
    return re.sub(rf"\b{re.escape(identifier)}\s+", "", text)


def feature_scores(groups: dict, reference_features: dict[str, torch.Tensor], scorers: dict, identifier: str) -> dict:
    """``dino`` and ``clip_i``: mean cosine of the subject-showing images (:data:`SUBJECT_KINDS`) to the
    references; ``clip_t``: mean image-prompt cosine over the request prompts (:data:`REQUEST_KINDS`);
    ``div_dino``: mean pairwise ``1 − cos`` of the DINO features of the subject prompt's images."""
    scores = {}
    subject = [im for kind in SUBJECT_KINDS for _, im in groups.get(kind, [])]
    requests = [(p, im) for kind in REQUEST_KINDS for p, im in groups.get(kind, [])]
    for name, scorer in scorers.items():
        key = "dino" if name == "dino" else "clip_i"
        if subject:
            scores[key] = float((scorer.image_features(subject) @ reference_features[name].T).mean())
        if name == "dino" and "subject" in groups:
            features = scorer.image_features([im for _, im in groups["subject"]]).cpu().numpy()
            scores["div_dino"] = mean_pairwise(features, cosine_distance)
        if name == "clip" and requests:
            images = scorer.image_features([im for _, im in requests])
            texts = scorer.text_features([without_identifier(p.text, identifier) for p, _ in requests])
            scores["clip_t"] = float((images * texts).sum(-1).mean())
    return scores


def instance_row(references: list[Image.Image], reference_features: dict, world_model: bool) -> dict:
    """The instance photos scored leave-one-out (each against the others), as the papers' real-images row."""
    scores = diversity(references, appearance=world_model)
    if world_model:
        similarity = leave_one_out(references)
        detected = [world.subject_detected([r], references[:i] + references[i + 1:])[0]
                    for i, r in enumerate(references)]
        scores.update(subject=float(similarity.mean()), detected=float(np.mean(detected)))
    for name, features in reference_features.items():
        n = len(features)
        off_diagonal = (features @ features.T)[~torch.eye(n, dtype=torch.bool)]
        scores["dino" if name == "dino" else "clip_i"] = float(off_diagonal.mean())
        if name == "dino":
            scores["div_dino"] = float(1 - off_diagonal.mean())
    return scores


# ---- training -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One adapter to train: ``algo`` with ``seed``, with or without prior preservation."""

    algo: str
    seed: int
    prior: bool = False

    @property
    def method(self) -> str:
        return self.algo + (" + prior" if self.prior else "")

    @property
    def folder_name(self) -> str:
        return f"{self.algo}{'-prior' if self.prior else ''}-seed{self.seed}"


def budget(args, algo: str) -> dict:
    """The trainer options of ``algo``'s size (:data:`BUDGETS`); ``{}`` (its sample config's size) for an
    algorithm registered after the table was made."""
    return BUDGETS["tiny-world" if args.world else "real"].get(algo, {})


def train_command(args, run: Run, folder: Path) -> list[str]:
    """The trainer's command line for ``run``: its sample config, then the benchmark's settings."""
    settings = {
        "pretrained_model_name_or_path": args.pipeline, "instance_data_dir": args.instance_dir,
        "instance_prompt": args.instance_prompt, "resolution": args.resolution, "unet_targets": args.targets,
        "max_train_steps": args.train_steps, "learning_rate": args.learning_rates.get(run.algo, args.learning_rate),
        "lr_scheduler": "constant",
        "train_batch_size": 1, "seed": run.seed, "output_dir": folder, "output_name": "adapter",
        "num_inference_steps": args.inference_steps, "validation_prompt": "",
        "checkpointing_steps": args.train_steps + 1, **budget(args, run.algo)}
    if run.prior:
        settings.update(with_prior_preservation=True, class_prompt=args.class_prompt,
                        class_data_dir=folder / "class_images", num_class_images=args.num_class_images)
    return [sys.executable, str(TRAINER), "--config", str(SAMPLES / f"dreambooth_{run.algo}.toml"), *to_argv(settings)]


def train(args, run: Run) -> dict:
    """Run the trainer for ``run`` (``OMP_NUM_THREADS=args.threads``); returns the adapter file, the
    trainer's count of trainable parameters and the wall time, also written to ``train.json`` in the
    run's folder. With ``args.reuse`` a run whose ``train.json`` is there is not trained again (an
    interrupted benchmark goes on where it stopped). Raises with the trainer's last output on failure."""
    folder = args.out / "runs" / run.folder_name
    record = folder / "train.json"
    if args.reuse and record.is_file():
        return json.loads(record.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run(train_command(args, run, folder), env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"training {run} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    count = re.search(r"([\d,]+) trainable parameters", done.stdout + done.stderr)
    adapter = re.search(r"^adapter: (.+)$", done.stdout + done.stderr, re.MULTILINE)
    result = {"adapter": adapter.group(1).strip(), "params": int(count.group(1).replace(",", "")),
              "train_s": round(seconds, 1)}
    record.write_text(json.dumps(result))
    return result


# ---- the table ----------------------------------------------------------------------------------------

#: column key -> header (↑: higher is better)
COLUMNS = {
    "params": "params", "subject": "subject sim ↑", "detected": "duck detected ↑", "dino": "DINO ↑",
    "clip_i": "CLIP-I ↑", "background": "background ↑", "kept": "duck kept on bg ↑", "colour": "colour ↑",
    "position": "position ↑", "clip_t": "CLIP-T ↑", "world": "world captions ↑", "div_a": "DIV-a ↑",
    "div_px": "DIV-px ↑", "div_dino": "DIV-dino ↑",
}


def summarize(values: list[float]) -> dict:
    """``{"mean", "std", "values"}``; ``std`` is the sample standard deviation (None for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def aggregate(name: str, per_seed: list[dict], params: int | None = None) -> dict:
    keys = [k for k in COLUMNS if k != "params" and all(k in s for s in per_seed)]
    return {"method": name, "params": params, "seeds": len(per_seed),
            "metrics": {k: summarize([s[k] for s in per_seed]) for k in keys}}


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table: ``mean ± std`` (3 decimals), only the columns some row has."""
    columns = [k for k in COLUMNS if k == "params" or any(k in r["metrics"] for r in rows)]
    lines = ["| method | " + " | ".join(COLUMNS[k] for k in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = []
        for k in columns:
            if k == "params":
                cells.append(f"{row['params']:,}" if row["params"] else "")
                continue
            m = row["metrics"].get(k)
            spread = f" ± {m['std']:.3f}" if m is not None and m["std"] is not None else ""
            cells.append("" if m is None else f"{m['mean']:.3f}{spread}")
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legend(args, weights: str) -> str:
    """The settings under the table, in words."""
    sizes = "; ".join(f"{a} " + ", ".join(f"{k} {v}" for k, v in budget(args, a).items()) for a in args.algos)
    rates = ", ".join(f"{a} {lr:g}" for a, lr in args.learning_rates.items())
    text = (f"{args.train_steps} steps of batch 1, learning rate {args.learning_rate:g} (constant)"
            f"{f'; except {rates}' if rates else ''}; targets {args.targets}; training seeds "
            f"{', '.join(map(str, args.seeds))} (mean ± sample standard deviation over them). Sizes: {sizes}. "
            f"Images: {args.subject_images} of \"{args.instance_prompt}\", {args.images_per_prompt} per other prompt"
            f"{f', {args.world_captions} held-out world captions' if args.world else ''}; {args.inference_steps} "
            f"steps, guidance {args.guidance:g}, {args.resolution} px. Weights: {weights}.")
    if args.world:
        text += (" Duck detected: world.subject_detected (nearer a duck photo, its mirror image or either "
                 "repainted on the image's background, than any of 3000 world scenes in 8×8 colour layout). Duck "
                 "kept: background right and the duck detected on it.")
    return text


def snapshot(folder: Path, out: Path) -> Path:
    """A copy of the tiny-world pipeline ``folder`` in ``out/tiny-world``: the trainings and the renders of
    one run all read this copy, even if the weights are replaced while it runs."""
    copy = out / "tiny-world"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy)
    return copy


def weights_id(pipeline: str | Path) -> str:
    """First 12 hex digits of the sha256 of the pipeline folder's UNet weights (the name itself for a hub
    id)."""
    files = sorted((Path(pipeline) / "unet").glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        return str(pipeline)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


# ---- the run ------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: lora and oft, 20 steps, 1 seed, few images")
    p.add_argument("--model", default=TINY_WORLD_NAME, help="tiny-world (default) or a diffusers SD folder / hub id")
    p.add_argument("--world-dir", type=Path, default=TINY_WORLD_DIR,
                   help="tiny-world's weights folder (default: the embedded one)")
    p.add_argument("--clip", help="CLIPModel + CLIPProcessor folder: CLIP-I and CLIP-T")
    p.add_argument("--dino", help="ViT folder for AutoModel + AutoImageProcessor: DINO")
    p.add_argument("--instance-dir", type=Path, default=SAMPLES / "instance")
    p.add_argument("--instance-prompt", default="a photo of sks duck")
    p.add_argument("--identifier", default="sks")
    p.add_argument("--class-noun", default="duck")
    p.add_argument("--resolution", type=int, help="default: 32 on tiny-world, 512 otherwise")
    p.add_argument("--algos", help="comma-separated (default: every registered algorithm)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (default: 0,1,2)")
    p.add_argument("--train-steps", type=int, default=900)
    p.add_argument("--learning-rate", type=float,
                   help="every algorithm's (default: 1e-3 on tiny-world, 1e-4 otherwise)")
    p.add_argument("--learning-rates", default="", help="per-algorithm exceptions, e.g. oft=3e-3,hra=3e-3")
    p.add_argument("--targets", help="UNet targets (default: unet-full on tiny-world, unet-attn-ff otherwise)")
    p.add_argument("--prior-algos", default="", help="comma-separated algorithms also trained with prior preservation")
    p.add_argument("--class-prompt", help="prior preservation's class prompt (default: the instance prompt "
                   "without the identifier)")
    p.add_argument("--num-class-images", type=int, default=16)
    p.add_argument("--subject-images", type=int, default=16, help="images of the instance prompt")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--world-captions", type=int, default=24, help="held-out world captions (tiny-world)")
    p.add_argument("--inference-steps", type=int, help="default: 20 on tiny-world, 50 otherwise")
    p.add_argument("--guidance", type=float, help="default: 3.0 on tiny-world, 7.5 otherwise")
    p.add_argument("--batch", type=int, default=64, help="images per pipeline call")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each training and of this process")
    p.add_argument("--reuse", action="store_true", help="keep the adapters of --out's finished runs (same settings)")
    p.add_argument("--device", default="cpu", help="where this process renders and scores")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_quality", help="runs and image grids")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    args.world = args.model == TINY_WORLD_NAME
    if args.quick:
        args.algos = args.algos or "lora,oft"
        args.seeds, args.train_steps = "0", min(args.train_steps, 20)
        args.subject_images, args.images_per_prompt, args.world_captions = 4, 1, 6
    args.algos = args.algos.split(",") if args.algos else list(lycoris_lite.ALGORITHMS)
    unknown = set(args.algos) - set(lycoris_lite.ALGORITHMS)
    if unknown:
        p.error(f"--algos: unknown {sorted(unknown)}; registered: {', '.join(lycoris_lite.ALGORITHMS)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.prior_algos = [a for a in args.prior_algos.split(",") if a]
    args.learning_rates = {algo: float(lr) for algo, lr in
                           (item.split("=") for item in args.learning_rates.split(",") if item)}
    for name, world_default, real_default in (("resolution", 32, 512), ("learning_rate", 1e-3, 1e-4),
                                              ("targets", "unet-full", "unet-attn-ff"),
                                              ("inference_steps", 20, 50), ("guidance", 3.0, 7.5)):
        if getattr(args, name) is None:
            setattr(args, name, world_default if args.world else real_default)
    args.class_prompt = args.class_prompt or without_identifier(args.instance_prompt, args.identifier)
    args.instance_dir = args.instance_dir.resolve()
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs = [Run(algo, seed, prior) for seed in args.seeds
            for prior in (False, True) for algo in (args.algos if not prior else args.prior_algos)]
    args.out.mkdir(parents=True, exist_ok=True)
    args.pipeline = snapshot(args.world_dir, args.out) if args.world else args.model
    weights = weights_id(args.pipeline)
    with ThreadPoolExecutor(args.jobs) as pool:  # trainings start now; this process renders meanwhile
        futures = {pool.submit(train, args, run): run for run in runs}

        pipe = lycoris_lite.enable(load_pipeline(args.pipeline)).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        references = load_references(args.instance_dir, args.resolution)
        scorers = {}
        if args.clip:
            scorers["clip"] = ClipScorer(args.clip, args.device)
        if args.dino:
            scorers["dino"] = DinoScorer(args.dino, args.device)
        reference_features = {name: s.image_features(references) for name, s in scorers.items()}
        colour = subject_colour(references) if args.world else None
        prompts = world_prompts(args, colour) if args.world else real_prompts(args)

        def evaluate(label: str) -> tuple[dict[str, float], dict]:
            """Render the prompts with the pipeline as it is, save a grid, return the scores and images."""
            groups = by_kind(prompts, render(pipe, prompts, args))
            grid = [im for kind in ("subject", "background", "colour", "position", "recontext", "property")
                    for _, im in groups.get(kind, [])]
            image_grid(grid, max(args.subject_images, 8), 64).save(args.out / f"{label}.png")
            scores = world_scores(groups, references) if args.world else {}
            scores.update(diversity([im for _, im in groups["subject"]], appearance=args.world))
            scores.update(feature_scores(groups, reference_features, scorers, args.identifier))
            return scores, groups

        base, base_groups = evaluate("base")
        per_run = {}
        for future in as_completed(futures):
            run = futures[future]
            if future.exception() is not None:
                for waiting in futures:  # the queued trainings; the one running finishes
                    waiting.cancel()
                raise future.exception()
            trained = future.result()
            pipe.load_adapter(trained["adapter"], scale=1.0)
            scores, _ = evaluate(run.folder_name)
            pipe.unload_adapters()
            per_run[run] = {**trained, "scores": scores}
            print(f"{run.folder_name}: {trained['params']:,} parameters, trained in {trained['train_s']} s; "
                  + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), file=sys.stderr, flush=True)

    rows = [aggregate("instance photos (leave-one-out)", [instance_row(
        references, reference_features, args.world)])]
    if args.world:
        rows.append(aggregate("base on world captions", [world_caption_reference(base_groups)]))
    rows.append(aggregate("base (no adapter)", [base]))
    for method in dict.fromkeys(run.method for run in runs):
        done = [per_run[r] for r in runs if r.method == method]
        rows.append(aggregate(method, [d["scores"] for d in done], done[0]["params"]))
    table = markdown_table(rows) + "\n\n" + legend(args, weights)
    result = {
        "model": args.model, "weights": weights, "table": table, "rows": rows,
        "subject_colour": colour, "budgets": {a: budget(args, a) for a in args.algos},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": [{"algo": r.algo, "seed": r.seed, "prior": r.prior, **per_run[r]} for r in runs],
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(f"{table}\n\n({result['wall_s']} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
