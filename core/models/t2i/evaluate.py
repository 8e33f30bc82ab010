"""Evaluating ``tiny-t2i``: held-out losses, and the closed loop (draw an image for each held-out
caption, caption it with a trained captioning model (the judge), compare with the prompt)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from isthmus.data import caption_matches, normalise_pixels
from isthmus.errors import IsthmusError
from isthmus.train.evaluate import loss_evaluation
from isthmus.models.t2i.sampling import text_to_image

GRID_PROMPTS = 16
SAMPLE_SEED = 1234  # the seed of the evaluation's draws: a fixed one, so runs compare like for like
PARTS = ("count", "colours", "shapes", "relations")
LABEL_CHARS = 68


class Judge:
    """A trained captioning checkpoint (a model whose ``task`` is ``"captioning"``) that captions
    images on a given backend."""

    def __init__(self, checkpoint: str | Path, backend: Any) -> None:
        from isthmus.registry.manager import get_registry
        from isthmus.train.restore import restore

        self.restored = restore(get_registry(), checkpoint)
        if self.restored.model.task != "captioning":
            raise IsthmusError(f"judge {checkpoint}: a captioning checkpoint is needed, this one holds "
                               f"{self.restored.model.name}")
        self.backend = backend
        self.params = {n: backend.engine.asarray(a) for n, a in self.restored.params.items()}

    def captions(self, images: np.ndarray, batch_size: int = 128) -> list[str]:
        """Captions of uint8 images ``(N, C, H, W)``."""
        k, engine = self.backend.kernels, self.backend.engine
        model = self.restored.model
        tokenizer = model.tokenizer
        steps = int(self.restored.data.eval.max_len)
        out: list[str] = []
        with engine.no_grad():
            for start in range(0, len(images), batch_size):
                pixels = engine.asarray(normalise_pixels(images[start : start + batch_size]))
                ids = engine.to_numpy(model.generate(k, self.params, {"images": pixels}, steps))
                out += [tokenizer.decode([int(t) for t in row]) for row in ids]
        return out


def match_rates(predicted: list[str], prompts: list[str]) -> dict[str, float]:
    """Share of ``predicted`` captions that match their prompt exactly, and part by part."""
    results = [caption_matches(p, t) for p, t in zip(predicted, prompts)]
    rates = {"closed_loop_match": float(np.mean([r["exact"] for r in results])) if results else 0.0}
    for part in PARTS:
        rates[f"closed_loop_{part}"] = float(np.mean([r[part] for r in results])) if results else 0.0
    return rates


def write_grid(path: Path, images: np.ndarray, prompts: list[str], captions: list[str] | None = None,
               columns: int = 4, scale: int = 4) -> Path:
    """A PNG of ``images`` (uint8 ``(N, C, H, W)``) with each prompt, and the judge's caption when given, below it."""
    from PIL import Image, ImageDraw

    from isthmus.train.atomic import write_bytes_atomic

    side = images.shape[-1] * scale
    label_height = 34 if captions is not None else 22
    # Wide enough for the longest scene caption (62 characters) in PIL's default 6-pixel font.
    cell_w, cell_h = max(side, LABEL_CHARS * 6 + 8), side + label_height
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        picture = Image.fromarray(np.moveaxis(image, 0, -1)).resize((side, side), Image.NEAREST)
        sheet.paste(picture, (x + (cell_w - side) // 2, y))
        draw.text((x + 2, y + side + 1), prompts[i][:LABEL_CHARS], fill=(0, 0, 0))
        if captions is not None:
            hit = caption_matches(captions[i], prompts[i])["exact"]
            draw.text((x + 2, y + side + 13), (("ok: " if hit else "read: ") + captions[i])[:LABEL_CHARS],
                      fill=(0, 120, 0) if hit else (200, 0, 0))
    import io

    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())
    return path


OPTIONS = ("judge", "seed")


def evaluate(model: Any, backend: Any, params: Mapping[str, Any], dataset: Any, *,
             batch_size: int = 128, max_samples: int | None = None, policy: Any = None, final: bool = False,
             out_dir: Path | None = None, **options: Any) -> dict[str, Any]:
    """Held-out ``eval_loss``, ``code_loss``, ``code_accuracy`` and ``noise_mse``. With ``final``:
    draw an image per held-out caption (seeded by the ``seed`` option), write ``samples.png`` to
    ``out_dir``, and with a ``judge`` checkpoint (option, else the model config's) report the
    closed-loop match rates."""
    unknown = [name for name in options if name not in OPTIONS]
    if unknown:
        raise IsthmusError(f"--option {unknown[0]}: {model.name} takes {', '.join(OPTIONS)}")
    judge = options.get("judge")
    try:
        seed = int(options.get("seed", SAMPLE_SEED))
    except ValueError:
        raise IsthmusError(f"--option seed={options['seed']}: not an integer") from None
    result = loss_evaluation(model, backend, params, dataset, batch_size=batch_size, max_samples=max_samples,
                             policy=policy)
    count = result["samples"]
    headline = (f"eval loss {result['eval_loss']:.4f}, code accuracy {result['code_accuracy']:.3f}, "
                f"noise mse {result['noise_mse']:.4f}")
    if final:
        prompts = [dataset.captions[i] for i in range(count)]
        rng = np.random.default_rng(seed)
        images = []
        for start in range(0, count, batch_size):
            tokens = dataset.batch(np.arange(start, min(count, start + batch_size)))["tokens"]
            images.append(text_to_image(model, backend, params, tokens, int(rng.integers(2**31)))[1])
        generated = np.concatenate(images) if images else np.zeros((0, 3, 1, 1), np.uint8)
        judge = judge if judge is not None else model.config.judge
        read = None
        if judge:
            reader = Judge(judge, backend)
            read = reader.captions(generated)
            result.update(match_rates(read, prompts))
            result["judge_on_real"] = match_rates(reader.captions(dataset.source.images[:count]), prompts)["closed_loop_match"]
            result["judge"] = str(judge)
            result["examples"] = [{"target": p, "predicted": r, "match": caption_matches(r, p)["exact"]}
                                  for p, r in list(zip(prompts, read))[:8]]
            headline += (f"; closed loop: {result['closed_loop_match'] * 100:.1f}% of {count} generated images "
                         f"read back as their prompt (the judge reads {result['judge_on_real'] * 100:.1f}% of the real ones)")
        else:
            headline += "; no judge checkpoint (model.judge), so no closed-loop match"
        if out_dir is not None:
            shown = min(GRID_PROMPTS, count)
            grid = write_grid(Path(out_dir) / "samples.png", generated[:shown], prompts[:shown],
                              read[:shown] if read is not None else None)
            result["grid"] = str(grid)
    result["headline"] = headline
    return result


__all__ = ["Judge", "evaluate", "match_rates", "write_grid"]
