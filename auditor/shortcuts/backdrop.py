"""``backdrop_cue``: the class's backgrounds, grafted behind other classes' objects, make those images the class.

A background texture or scene tied to one class (the Waterbirds pattern: water behind waterbirds, land behind
landbirds) lies everywhere outside the object, so no window of the region scan holds it, the border test's
control ring holds it as well as the band does, and a texture is no colour the colour shift moves. This test
moves the background itself. Per class, on keyed draws of its images and of other classes' images:

1. each other-class image keeps its object (its mask grown by a margin; without masks, the smallest set of pixels
   holding half of its map's mass, at most a quarter of the image) and takes everything else from a class image,
   whose own object's place is left to the recipient, so no part of the donor's object comes along;
2. the null: the same graft with another other-class image as the donor (any background, its object left out);
3. per recipient, p(class) with the class's background minus with the null's is the effect;
4. without masks, the maps' hot places stand in for the objects, and a map that misses its object lets the
   object come along (a clean ViT's 8 x 8 maps held 10% of its discs: grafting disc "backgrounds" turned 84% of
   the recipients). So where a graft of images without masks reaches the flag's effect sizes, the class images'
   objects are looked for with the model (:func:`model_objects`: the half-side windows whose filling-in takes
   the class away), spared as well, and the graft redone; its numbers are the ones judged.

A transplant moves much more of the image than a box does, and the objects that the sparing misses come along
with their background (measured on clean planted scenes: effects up to 0.19 with small objects, up to 0.51 with
objects half the frame, without masks). So only an effect comparable to taking the class away stands: the mean
gain must reach ``high_effect`` and the class's backgrounds must turn a majority of the recipients into the
class beyond the null, significant in the run's BH family. Such a flag is high.

The reverse is the class's own images on other classes' backgrounds (against other class images' backgrounds): a
model that reads one class's background calls the other classes for its absence, so the graft above names those
classes, and only the reverse names the class that is read (a two-class texture model that depended on one
class's brick was named on the other class in 4 of 5 runs without masks, never on the brick class; in two classes
the reverse of one class is the graft of the other). Where the graft does not stand, the reverse stands on the
same terms: ``high_effect`` of p(class) lost, a majority of the class's images no longer called the class beyond
the null, significant. Without masks, where the reverse reaches those effect sizes, the donors' objects (now
other classes' images) are looked for with the model, spared, and the graft redone, as in step 4. Either flag is
low where the donors' maps point at one place, without masks (a large object may have come along).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from auditor.shortcuts.findings import Cause
from auditor.shortcuts.flags import Flag, change, make_flag, pct
from auditor.shortcuts.grids import has_object
from auditor.shortcuts.registry import (
    Analysis,
    AnalysisInputs,
    FlagContext,
    Measurement,
    PerClass,
    gather_entries,
    keyed_rows,
    register_analysis,
)
from auditor.shortcuts.thresholds import SharedParams, params_of
from auditor.shortcuts.triage import class_ceilings, not_recognized
from auditor.shortcuts.windows import grid_boxes

COMPACT = 0.75  # without masks, maps whose hot pixels lie this much in one connected part point at an object
WINDOW = 0.5  # side of the windows that find, without a mask, where the model sees the class in an image
LOCAL_SHARE = 0.5  # ... those whose filling-in takes this share of the image's largest drop are spared


class Params(SharedParams):
    """``backdrop_cue``'s thresholds (config ``thresholds``, flat keys)."""

    backdrop_images: int = Field(
        32,
        ge=0,
        description="images of the class, and of other classes, the background graft uses; 0 turns the test off",
    )


def _graft_class(measured: Measurement, inputs: AnalysisInputs, cls: str) -> dict[str, Any]:
    """One class's work item: the graft and its reverse on keyed draws, redone sparing the model-found objects of
    the class's images where the graft reaches its effect sizes, and of the other images where the reverse does
    (images without masks only). The triage skips a class the model does not recognise
    (``shortcuts.triage.not_recognized``; no probe: on 8 images it missed a background a 32-image graft found,
    0.19 against 0.67, on a planted marker). Returns ``{"backdrop": the class's entry or None, "triage": reason
    or None}``."""
    assert inputs.intervener is not None
    t, first = params_of(inputs.thresholds, Params), inputs.first
    mine, rest = first[first["label"] == cls], first[first["label"] != cls]
    own = np.sort(keyed_rows(mine, t.backdrop_images, inputs.seed, "backdrop")).tolist()
    other = np.sort(keyed_rows(rest, t.backdrop_images, inputs.seed, "backdrop")).tolist()
    if len(own) < t.min_group or len(other) < t.min_group:
        return {"backdrop": None, "triage": None}
    if t.triage:
        ceilings = inputs.memo("ceilings", lambda: class_ceilings(first, inputs.target))
        reason = not_recognized(ceilings, cls, t.high_effect)
        if reason is not None:
            return {"backdrop": None, "triage": reason}
    method, idx = inputs.hot_method, inputs.classes.index(cls)
    test = inputs.intervener.graft_test(own, other, idx, method)
    entry: dict[str, Any] = {"n": len(own), "method": method, "test": test}
    bare = _without_mask(inputs, own)
    spare: dict[int, list[list[float]]] = {}
    if bare and reaches(test, t.high_effect):
        spare = model_objects(inputs, bare, idx, t.high_effect)
        entry |= {"unspared": test, "spared_images": len(spare), "bare_images": len(bare)}
        test = entry["test"] = inputs.intervener.graft_test(own, other, idx, method, spare)
    donors = _without_mask(inputs, other)
    if donors and reaches_reverse(test, t.high_effect):
        labels = inputs.first.set_index("row").loc[donors, "label"]
        theirs = model_objects(inputs, donors, [inputs.classes.index(c) for c in labels], t.high_effect)
        entry |= {"reverse_unspared": test, "donors_spared": len(theirs), "bare_donors": len(donors)}
        entry["test"] = inputs.intervener.graft_test(own, other, idx, method, spare | theirs)
    return {"backdrop": entry, "triage": None}


def _without_mask(inputs: AnalysisInputs, rows: list[int]) -> list[int]:
    """The ``rows`` whose image has no mask or box: where the model, not a mask, must find the object."""
    return [r for r, has in zip(rows, has_object(inputs.objects, np.asarray(rows)), strict=True) if not has]


def reaches(test: dict[str, Any], high_effect: float) -> bool:
    """The flag's effect sizes (not its significance): the grafted backgrounds raise p(class) by
    ``high_effect`` and turn a majority of the recipients into the class beyond the null."""
    return bool(test["paste_effect"] >= high_effect and test["paste_flips"] - test["null_flips"] > 0.5)


def reaches_reverse(test: dict[str, Any], high_effect: float) -> bool:
    """The reverse flag's effect sizes: on other classes' backgrounds the class's images lose ``high_effect`` of
    p(class), and a majority of them is no longer called the class beyond the null (other class images'
    backgrounds)."""
    turned = test["removal_flips"] - test["removal_null_flips"]
    return bool(test["removal_effect"] >= high_effect and turned > 0.5)


def object_windows() -> list[list[float]]:
    """The windows :func:`model_objects` fills in each image: half the side, half-overlapping (9; an object up
    to a quarter of the side lies whole in one of them)."""
    return grid_boxes(WINDOW, WINDOW / 2)


def model_objects(
    inputs: AnalysisInputs, rows: list[int], idx: int | list[int], least: float
) -> dict[int, list[list[float]]]:
    """Per image, the windows (:func:`object_windows`) whose filling-in lowers its p(class) (``idx``: the class, or
    each image's own) by ``least`` (the graft passes ``high_effect``: the window takes the class away) and by
    ``LOCAL_SHARE`` of the image's largest drop: where the model finds the class in that image. Without a mask the
    graft spares the map's hot places, and a map that misses the object (a vision transformer's 8 x 8 grid: a
    clean ViT's maps held 10% of its discs) lets the object come along with the background. A texture that lies
    everywhere survives the loss of any one window (measured on a planted grass cue: largest drop 0.27 over 32
    images; the ViT's discs: 0.99 to 1.00 in 13 of 20), so none of it is spared."""
    assert inputs.intervener is not None
    boxes = object_windows()
    drops = inputs.intervener.scan(rows, idx, boxes)
    out = {}
    for row, d in zip(rows, drops, strict=True):
        picked = np.flatnonzero(d >= max(least, LOCAL_SHARE * float(np.max(d))))
        if len(picked):
            out[int(row)] = [boxes[j] for j in picked]
    return out


WORK = PerClass(
    classes=lambda measured, inputs: (
        list(inputs.classes) if params_of(inputs.thresholds, Params).backdrop_images else []
    ),
    run=_graft_class,
    gather=gather_entries("backdrops", "backdrop"),
    what="background graft, classes",
)


def measure(inputs: AnalysisInputs) -> Measurement:
    """The graft needs the model: without it nothing is measured (the work items fill ``backdrops``)."""
    return {"backdrops": {}}


def tests(measured: Measurement) -> dict[str, float]:
    """Per class grafted, the recipients' paired test (the class's background against the null's) and the
    reverse's (the class's images on their own class's backgrounds against other classes')."""
    out = {f"paste/{c}": r["test"]["paste_p"] for c, r in measured["backdrops"].items()}
    return out | {f"removal/{c}": r["test"]["removal_p"] for c, r in measured["backdrops"].items()}


def _message(c: str, r: dict[str, Any]) -> str:
    test = r["test"]
    gain = change(test["paste_effect"], f"p({c})")
    return (
        f"Grafting the background of {c} images behind other classes' objects {gain} "
        f"over other classes' backgrounds and turns {pct(test['paste_flips'])} of {test['n_pasted']} images into {c} "
        f"(other backgrounds: {pct(test['null_flips'])}); {c} images on other classes' backgrounds: "
        f"{change(-test['removal_effect'], f'p({c})')}."
    ) + _spared_note(c, r)


def _spared_note(c: str, r: dict[str, Any]) -> str:
    """What the graft spared besides the maps' hot places, where it looked for the donors' objects."""
    if "unspared" not in r:
        return ""
    first = r["unspared"]["paste_effect"]
    return (
        f" Without masks, the places where filling in takes p({c}) away were kept out of the graft too, in "
        f"{r['spared_images']} of {r['bare_images']} {c} images (before that the effect was {first:.2f})."
    )


def _reverse_message(c: str, r: dict[str, Any]) -> str:
    test = r["test"]
    return (
        f"On other classes' backgrounds (their objects kept out of the graft) {c} images lose "
        f"{test['removal_effect']:.2f} of p({c}) against other {c} images' backgrounds, and "
        f"{pct(test['removal_flips'])} of {test['n_removed']} are no longer called {c} (on other {c} backgrounds: "
        f"{pct(test['removal_null_flips'])}): {c} is told by its background."
    ) + _donors_note(r)


def _donors_note(r: dict[str, Any]) -> str:
    """What the reverse spared besides the maps' hot places, where it looked for the donors' objects."""
    if "reverse_unspared" not in r:
        return ""
    first = r["reverse_unspared"]["removal_effect"]
    return (
        f" Without masks, the places where filling in takes their own class away were kept out of the graft too, "
        f"in {r['donors_spared']} of {r['bare_donors']} other images (before that the loss was {first:.2f})."
    )


def _large_object(whose: str, compact: float) -> str:
    return (
        f" Without masks, the {whose} maps point at one place (its largest connected part holds {pct(compact)} of "
        f"their hot pixels): what came with the background may be a large object."
    )


def backdrop_flags(measured: Measurement, ctx: FlagContext) -> list[Flag]:
    """``backdrop_cue`` per class, high, one flag a class: the grafted backgrounds raise p(class) by
    ``high_effect`` and turn a majority of the recipients into the class beyond the null, significantly; else the
    reverse: on other classes' backgrounds the class's images lose ``high_effect`` of p(class) and a majority of
    them the class, significantly. Low where the donors' maps (the class's for the graft, the other classes' for
    the reverse) point at one place, without masks: a large object may have come along."""
    t = params_of(ctx.thresholds, Params)
    q = ctx.q_values("backdrop", tests(measured))
    flags = []
    for c, r in measured["backdrops"].items():
        test = r["test"]
        methods = [r["method"]] if r["method"] else []  # its hot places stand in for objects without masks
        if reaches(test, t.high_effect) and q[f"paste/{c}"] < t.alpha:
            turned, score, msg = test["paste_flips"] - test["null_flips"], test["paste_effect"], _message(c, r)
            evidence = {**r, "direction": "paste", "paste_q": q[f"paste/{c}"], "turned": float(turned)}
            compact, whose = test.get("own_compact"), f"{c} images'"
        elif reaches_reverse(test, t.high_effect) and q[f"removal/{c}"] < t.alpha:
            turned, score = test["removal_flips"] - test["removal_null_flips"], test["removal_effect"]
            msg = _reverse_message(c, r)
            evidence = {**r, "direction": "removal", "removal_q": q[f"removal/{c}"], "turned": float(turned)}
            compact, whose = test.get("other_compact"), "other classes' images'"
        else:
            continue
        low = compact is not None and compact >= COMPACT
        msg += _large_object(whose, compact) if low else ""
        sev = "low" if low else "high"
        flags.append(make_flag("backdrop_cue", c, None, sev, float(min(1.0, score)), msg, evidence, methods))
    return flags


ANALYSIS = register_analysis(
    Analysis(
        name="backdrop",
        params=Params,
        kinds={"backdrop_cue": Cause("background", leads=True)},
        needs=frozenset({"model"}),
        measure=measure,
        flag=backdrop_flags,
        per_class=WORK,
        tests=tests,
    )
)
