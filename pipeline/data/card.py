"""Dataset statistics (class frequencies, suggested class weights) and the dataset card."""

from __future__ import annotations

import numpy as np

from pipeline.data.datasets import ClassSpec


def class_statistics(hists: list[np.ndarray], spec: ClassSpec) -> dict:
    """Pixel statistics of one split from per-image value histograms (length 256).

    Returns per-class pixel counts and frequencies (over labelled pixels, ignore left
    out) and two suggested loss weights:
    - ``median_frequency``: median(f) / f_c with f_c = pixels of c / pixels of the
      images where c appears (Eigen & Fergus 2015; SegNet's CamVid weights);
    - ``enet``: 1 / ln(1.02 + p_c) with p_c the class's share of labelled pixels
      (Paszke et al. 2016), bounded between 1 and 50.
    A class with no pixels gets weight 0 and is listed under ``absent``.
    """
    c = spec.num_classes
    counts = np.zeros(c, dtype=np.int64)
    image_pixels = np.zeros(c, dtype=np.int64)
    for hist in hists:
        h = hist[:c]
        counts += h
        image_pixels[h > 0] += int(h.sum())
    total = int(counts.sum())
    share = counts / total if total else np.zeros(c)
    present = counts > 0
    mf = np.zeros(c)
    if present.any():
        freq = counts[present] / image_pixels[present]
        mf[present] = np.median(freq) / freq
    enet = np.where(present, 1.0 / np.log(1.02 + share), 0.0)
    return {
        "pixels": {n: int(v) for n, v in zip(spec.names, counts, strict=True)},
        "frequency": {n: round(float(v), 6) for n, v in zip(spec.names, share, strict=True)},
        "weights": {
            "median_frequency": [round(float(v), 4) for v in mf],
            "enet": [round(float(v), 4) for v in enet],
        },
        "labelled_pixels": total,
        "absent": [n for n, p in zip(spec.names, present, strict=True) if not p],
    }


def render_markdown(card: dict) -> str:
    """The dataset card as Markdown, for people; card.json holds the same facts."""
    ignore = f"- Ignore label: {card['classes']['ignore_index']} (left out of losses and metrics)"
    lines = _header(card, "", ignore)
    lines += [
        "## Splits",
        "",
        "| split | images | min size (HxW) | max size (HxW) |",
        "|---|---|---|---|",
    ]
    for split, s in card["splits"].items():
        lines.append(f"| {split} | {s['images']} | {s['min_size']} | {s['max_size']} |")
    weights = card["train_statistics"]["weights"]
    lines += [
        "",
        "## Classes (train split)",
        "",
        "| index | class | colour | pixel share | median-freq weight | ENet weight |",
        "|---|---|---|---|---|---|",
    ]
    names = card["classes"]["names"]
    for i, name in enumerate(names):
        r, g, b = card["classes"]["palette"][i]
        share = card["train_statistics"]["frequency"][name]
        lines.append(
            f"| {i} | {name} | `#{r:02x}{g:02x}{b:02x}` | {100 * share:.2f} % | "
            f"{weights['median_frequency'][i]:.3f} | {weights['enet'][i]:.3f} |"
        )
    return "\n".join(lines + _checks(card)) + "\n"


def _header(card: dict, kind: str, *facts: str) -> list[str]:
    """A card's title, where its data came from, ``facts`` and the resize, then a blank line."""
    src = card["source"]
    return [
        f"# Dataset card: {card['dataset']}{kind}",
        "",
        f"- Source: {src.get('homepage') or 'user folder'}",
        f"- License: {src.get('license') or 'as given by the data owner'}",
        *([f"- Cite: {src['citation']}"] if src.get("citation") else []),
        f"- Raw data digest (sha256 tree): `{card['raw_tree_sha256']}`",
        *facts,
        f"- Resize: train {_resize_text(card['resize']['train'])}, "
        f"evaluation {_resize_text(card['resize']['eval'])}",
        "",
    ]


def _checks(card: dict) -> list[str]:
    """A card's closing section: the problems found and the notes."""
    problems = card["problems"]
    return [
        "",
        "## Checks",
        "",
        f"- Problems: {problems['errors']} file(s) with errors "
        f"({'skipped' if not problems['strict'] else 'none allowed in strict mode'}), "
        f"{problems['warnings']} warning(s); details in problems.json.",
        *(f"- {note}" for note in card.get("notes", [])),
    ]


def _resize_text(resize: dict) -> str:
    if resize["mode"] == "none":
        return "native size"
    if resize["mode"] == "fixed":
        return "fixed {}x{} (HxW)".format(*resize["size"])
    return f"{resize['mode'].replace('_', ' ')} {resize['size']} px"


def render_instance_markdown(card: dict) -> str:
    """The card of an instance dataset (``task: instance``) as Markdown."""
    lines = _header(card, " (instance segmentation)")
    lines += [
        "## Splits",
        "",
        "| split | images | instances | crowd | min size (HxW) | max size (HxW) |",
        "|---|---|---|---|---|---|",
    ]
    for split, s in card["splits"].items():
        lines.append(f"| {split} | {s['images']} | {s['instances']} | {s['crowd']} | "
                     f"{s['min_size']} | {s['max_size']} |")
    names = card["classes"]["names"]
    splits = list(card["splits"])
    lines += [
        "",
        "## Classes (instances per split, crowd regions apart)",
        "",
        "| index | class | colour | " + " | ".join(splits) + " |",
        "|---|---|---|" + "---|" * len(splits),
    ]
    for i, name in enumerate(names):
        r, g, b = card["classes"]["palette"][i]
        counts = " | ".join(str(card["statistics"][s]["instances"][name]) for s in splits)
        lines.append(f"| {i} | {name} | `#{r:02x}{g:02x}{b:02x}` | {counts} |")
    return "\n".join(lines + _checks(card)) + "\n"


def render_panoptic_markdown(card: dict) -> str:
    """The card of a panoptic dataset (``task: panoptic``) as Markdown."""
    void = f"- Void (no segment) reads as class {card['classes']['ignore_index']} in the semantic view"
    lines = _header(card, " (panoptic segmentation)", void)
    lines += [
        "## Splits",
        "",
        "| split | images | segments | things | stuff | crowd | min size (HxW) | max size (HxW) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {split} | {s['images']} | {s['segments']} | {s['things']} | {s['stuff']} | {s['crowd']} | "
              f"{s['min_size']} | {s['max_size']} |" for split, s in card["splits"].items()]
    splits = list(card["splits"])
    lines += [
        "",
        "## Classes (segments per split, crowd regions apart)",
        "",
        "| index | class | kind | colour | " + " | ".join(splits) + " |",
        "|---|---|---|---|" + "---|" * len(splits),
    ]
    classes = card["classes"]
    for i, name in enumerate(classes["names"]):
        r, g, b = classes["palette"][i]
        counts = " | ".join(str(card["statistics"][s]["segments"][name]) for s in splits)
        kind = "thing" if classes["isthing"][i] else "stuff"
        lines.append(f"| {i} | {name} | {kind} | `#{r:02x}{g:02x}{b:02x}` | {counts} |")
    return "\n".join(lines + _checks(card)) + "\n"
