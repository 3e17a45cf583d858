"""Templated RIAD text: the defect-category table, facts read off a mask, and the three answers.

RIAD's answers (paper Sec. IV) were written by GPT-4 from the image and its COCO mask: a description,
an impact analysis and a suggestion per anomalous image, plus a normal description per class. We have no
GPT-4, so the builder writes them from templates (OURS): the defect category gives the wording of what
it is, why it matters and what to do; the mask gives where it is (the centroid in a 3x3 grid), how large
(area fraction -> small / medium / large, and its size in pixels) and how many (8-connected regions).
Each answer picks one of several phrasings with a seeded RNG.

Defect categories (OURS; the paper has 15 types but does not list them): ``DEFECT_CATEGORIES`` below,
ids 1-15, fixed. Source defect names map to them by :func:`canonical_category` (exact synonym first,
then keyword contained in the name, else ``other``); the synthetic kinds map to scratch, crack, spot,
contamination, broken (``missing_piece``) and foreign_texture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from vmad.errors import ConfigError


@dataclass(frozen=True)
class DefectCategory:
    """One defect category: COCO id and name, the noun used in text, synonyms and keywords for mapping
    source defect names, and phrases for the impact and suggestion answers."""

    id: int
    name: str
    noun: str
    plural: str
    synonyms: tuple[str, ...]
    keywords: tuple[str, ...]
    impacts: tuple[str, ...]
    actions: tuple[str, ...]


def _c(id_, name, noun, plural, synonyms, keywords, impacts, actions) -> DefectCategory:
    return DefectCategory(
        id_, name, noun, plural, tuple(synonyms), tuple(keywords), tuple(impacts), tuple(actions)
    )


DEFECT_CATEGORIES: tuple[DefectCategory, ...] = (
    _c(
        1,
        "scratch",
        "scratch",
        "scratches",
        ["scratch", "scratches", "scuff", "abrasion"],
        ["scratch", "scuff", "abras"],
        [
            "a scratch spoils the surface finish and can let corrosion start where the coating is cut",
            "a scratch weakens the protective surface layer and is visible to the customer",
        ],
        [
            "check the fixtures, conveyors and tools that touch the surface for sharp edges or debris",
            "review handling and packaging so that parts do not rub against each other",
        ],
    ),
    _c(
        2,
        "crack",
        "crack",
        "cracks",
        ["crack", "cracks", "fissure", "fracture_line"],
        ["crack", "fissur"],
        [
            "a crack lowers the mechanical strength and can grow under load until the part fails",
            "cracks are structural: they may propagate during use and cause a sudden breakage",
        ],
        [
            "check the sintering, cooling or pressing parameters for thermal or mechanical stress",
            "inspect the other parts of the batch, since cracks often come from one process step",
        ],
    ),
    _c(
        3,
        "spot",
        "spot",
        "spots",
        ["spot", "spots", "dot", "dots", "speck", "blotch", "point"],
        ["spot", "speck", "blotch"],
        [
            "spots are mostly cosmetic but can hide pitting or residue underneath",
            "a spot changes the appearance of the surface and may point to a local material flaw",
        ],
        [
            "clean the area and check whether the spot comes back after wiping",
            "check the coating and drying steps for drips or splashes",
        ],
    ),
    _c(
        4,
        "contamination",
        "contamination",
        "contaminations",
        ["contamination", "dirt", "dust", "stain", "stains", "oil", "glue", "residue", "liquid"],
        ["contamin", "dirt", "dust", "stain", "oil", "glue", "residue", "liquid"],
        [
            "contamination can stop coatings, adhesives or seals from bonding and may be a hygiene risk",
            "foreign matter on the surface can interfere with assembly and with later processing",
        ],
        [
            "clean the part and the production line; check lubricants, seals and the air supply",
            "find the source of the residue (handling, lubricant, environment) and keep the area clean",
        ],
    ),
    _c(
        5,
        "broken",
        "broken piece",
        "broken pieces",
        ["broken", "broken_large", "broken_small", "break", "missing", "missing_piece", "chip", "chipped"],
        ["broken", "break", "missing", "chip", "damage"],
        [
            "a missing piece changes the part's shape and fit, and its sharp edges can fail further",
            "material is missing, so the part may not fit or seal and can break further in use",
        ],
        [
            "check the handling and transport steps where the part can be knocked",
            "check the tooling and the transfer points for impacts and worn grippers",
        ],
    ),
    _c(
        6,
        "foreign_texture",
        "foreign texture patch",
        "foreign texture patches",
        ["foreign_texture", "foreign", "foreign_object", "foreign_body", "texture"],
        ["foreign", "texture"],
        [
            "a foreign patch means other material is present and changes the local surface properties",
            "the patch of foreign material breaks the uniform surface and can detach or hide a flaw",
        ],
        [
            "remove the foreign material and check the line for debris or mixed-up materials",
            "check the material supply and the workspace for foreign objects",
        ],
    ),
    _c(
        7,
        "hole",
        "hole",
        "holes",
        ["hole", "holes", "blowhole", "blowholes", "pore", "pores", "pit", "pits"],
        ["hole", "pore", "pit", "poke"],
        [
            "a hole or pore reduces the strength and density of the part and can let moisture in",
            "holes weaken the material locally and may leak or crack further under load",
        ],
        [
            "check the material mixture and pressing for trapped gas or voids",
            "check the casting or sintering atmosphere and the raw material for porosity",
        ],
    ),
    _c(
        8,
        "deformation",
        "deformation",
        "deformations",
        [
            "dent",
            "dents",
            "bent",
            "bend",
            "deformation",
            "deformed",
            "squeeze",
            "squeezed",
            "fold",
            "wrinkle",
        ],
        ["dent", "bent", "bend", "deform", "squeez", "fold", "wrinkl", "warp"],
        [
            "a deformation changes the part's geometry, so it may not fit or work as designed",
            "the deformed area can cause assembly problems and uneven loading in use",
        ],
        [
            "check the forming and clamping steps and the handling forces",
            "measure the geometry against the drawing and check the press or mould",
        ],
    ),
    _c(
        9,
        "discoloration",
        "discoloured area",
        "discoloured areas",
        [
            "color",
            "colour",
            "discoloration",
            "discolouration",
            "patches",
            "patch",
            "oxidation",
            "rust",
            "burn",
        ],
        ["colo", "discolo", "oxid", "rust", "burn"],
        [
            "discolouration can point to oxidation or overheating and spoils the appearance",
            "a colour change may mean the material or its coating has been altered locally",
        ],
        [
            "check the heat treatment, the coating and the storage conditions",
            "check for overheating and moisture; compare with a reference colour sample",
        ],
    ),
    _c(
        10,
        "fray",
        "frayed area",
        "frayed areas",
        ["fray", "frayed", "fraying", "fuzz", "hairy"],
        ["fray", "fuzz", "hairy"],
        [
            "a frayed edge weakens the material and can spread further",
            "fraying lowers the strength of the edge and looks poor",
        ],
        [
            "check the cutting and finishing tools for wear",
            "check the edge finishing step and the tension during processing",
        ],
    ),
    _c(
        11,
        "uneven",
        "uneven area",
        "uneven areas",
        ["uneven", "unevenness", "rough", "roughness", "bump"],
        ["uneven", "rough", "bump", "wav"],
        [
            "an uneven surface can prevent a flat fit and causes uneven wear",
            "unevenness changes the surface profile, which matters for fit and for the magnetic gap",
        ],
        [
            "check the grinding or polishing step and the wear of the grinding wheel",
            "measure the flatness and check the finishing machine's settings",
        ],
    ),
    _c(
        12,
        "inclusion",
        "inclusion",
        "inclusions",
        ["inclusion", "inclusions", "impurity", "impurities"],
        ["inclusion", "impurit", "particle", "embedded"],
        [
            "an inclusion is a local weak point inside the material where cracks can start",
            "embedded foreign particles weaken the material and can break out of the surface",
        ],
        [
            "check the purity of the raw material and the melting or rolling process",
            "check the raw material batch for impurities and clean the process equipment",
        ],
    ),
    _c(
        13,
        "misplaced",
        "misplaced component",
        "misplaced components",
        ["misplaced", "misaligned", "misalignment", "flip", "flipped", "swap", "shift", "shifted"],
        ["misplac", "misalign", "flip", "swap", "shift", "rotat"],
        [
            "a misplaced component stops the assembly from working as intended",
            "misalignment can cause faulty connections and mechanical stress",
        ],
        [
            "check the placement and assembly station and its calibration",
            "verify the component positions against the assembly drawing",
        ],
    ),
    _c(
        14,
        "cut",
        "cut",
        "cuts",
        ["cut", "cuts", "cut_lead", "incision", "tear", "torn", "gap"],
        ["cut", "tear", "torn", "incis"],
        [
            "a cut severs material and can make the part fail or expose what lies beneath",
            "the cut weakens the part and can widen during use",
        ],
        [
            "check blades and sharp edges in the process and the handling steps",
            "review the cutting and trimming operations and guard sharp tools",
        ],
    ),
    _c(
        15,
        "other",
        "defect",
        "defects",
        ["other", "anomaly", "defect", "defects", "abnormal", "bad", "ng"],
        [],
        [
            "the defect may affect the function or appearance of the part",
            "this anomaly means the part deviates from the normal product and may not meet its specification",
        ],
        [
            "inspect the part closely and trace the defect to its process step",
            "compare with normal parts and review the process records of this batch",
        ],
    ),
)

CATEGORIES_BY_NAME: dict[str, DefectCategory] = {c.name: c for c in DEFECT_CATEGORIES}
CATEGORIES_BY_ID: dict[int, DefectCategory] = {c.id: c for c in DEFECT_CATEGORIES}
SYNTHETIC_CATEGORY: dict[str, str] = {
    "scratch": "scratch",
    "crack": "crack",
    "spot": "spot",
    "contamination": "contamination",
    "missing_piece": "broken",
    "foreign_texture": "foreign_texture",
}
SYNTHETIC_PREFIX = "synthetic_"


def _normalise(name: str) -> str:
    name = name.strip().lower().replace("-", "_").replace(" ", "_")
    return name[3:] if name.startswith("mt_") else name


def canonical_category(defect_type: str) -> DefectCategory:
    """The category of a source defect name (e.g. ``Blowhole`` -> hole, ``broken_large`` -> broken,
    ``synthetic_missing_piece`` -> broken). A ``+``-joined name maps by its first part."""
    name = _normalise(defect_type.split("+")[0])
    if name.startswith(SYNTHETIC_PREFIX):
        name = SYNTHETIC_CATEGORY.get(name[len(SYNTHETIC_PREFIX) :], name[len(SYNTHETIC_PREFIX) :])
    for c in DEFECT_CATEGORIES:
        if name == c.name or name in c.synonyms:
            return c
    for c in DEFECT_CATEGORIES:
        if any(k in name for k in c.keywords):
            return c
    return CATEGORIES_BY_NAME["other"]


def defect_name(defect_type: str) -> str:
    """Readable defect name for text: ``synthetic_missing_piece`` -> "missing piece",
    ``inclusion+scratches`` -> "inclusion and scratches", ``Blowhole`` -> "blowhole"."""
    name = defect_type.strip()
    if name.lower().startswith(SYNTHETIC_PREFIX):
        name = name[len(SYNTHETIC_PREFIX) :]
    if name.lower().startswith("mt_"):
        name = name[3:]
    parts = [p.replace("_", " ").replace("-", " ").strip().lower() for p in name.split("+")]
    return " and ".join(p for p in parts if p) or "defect"


def object_name(class_name: str) -> str:
    """``magnetic_tile`` -> "magnetic tile"."""
    return class_name.replace("_", " ").replace("-", " ").strip() or "object"


# ---------------------------------------------------------------------------------------- mask facts

GRID = (
    ("upper left", "top", "upper right"),
    ("left", "center", "right"),
    ("lower left", "bottom", "lower right"),
)


@dataclass(frozen=True)
class TextConfig:
    """Size words (OURS): area fraction below ``small_fraction`` is small, below ``medium_fraction``
    medium, else large."""

    small_fraction: float = 0.01
    medium_fraction: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.small_fraction < self.medium_fraction < 1.0:
            raise ConfigError("TextConfig needs 0 < small_fraction < medium_fraction < 1")


@dataclass(frozen=True)
class MaskFacts:
    """What the text says about a mask: number of 8-connected regions, area (pixels and fraction), size
    word, bounding box size (w, h) of all regions together, the 3x3-grid cell of the centroid and the
    cells of the regions' own centroids (largest region first, no repeats)."""

    count: int
    area: int
    fraction: float
    size_word: str
    box: tuple[int, int]
    where: str
    region_cells: tuple[str, ...]


def grid_cell(y: float, x: float, height: int, width: int) -> str:
    """The 3x3-grid cell name of a point (row from y, column from x)."""
    row = min(2, max(0, int(3 * y / height)))
    col = min(2, max(0, int(3 * x / width)))
    return GRID[row][col]


def mask_facts(mask: np.ndarray, cfg: TextConfig = TextConfig()) -> MaskFacts | None:
    """Facts of a bool (H, W) mask; None when it is empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    h, w = mask.shape
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    area = int(mask.sum())
    fraction = area / (h * w)
    size = (
        "small" if fraction < cfg.small_fraction else "medium" if fraction < cfg.medium_fraction else "large"
    )
    ys, xs = np.nonzero(mask)
    box = (int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    centres = ndimage.center_of_mass(mask, labels, index=np.arange(1, count + 1))
    cells: list[str] = []
    for i in np.argsort(-np.asarray(sizes), kind="stable"):
        cell = grid_cell(centres[i][0], centres[i][1], h, w)
        if cell not in cells:
            cells.append(cell)
    return MaskFacts(count, area, fraction, size, box, grid_cell(ys.mean(), xs.mean(), h, w), tuple(cells))


# ------------------------------------------------------------------------------------------- answers

_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def number_word(n: int) -> str:
    return _NUMBERS[n] if 0 <= n < len(_NUMBERS) else str(n)


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _join(items: tuple[str, ...] | list[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe_location(facts: MaskFacts) -> str:
    """ "the upper left" or, for several regions in different cells, "the upper left and the bottom"."""
    cells = facts.region_cells[:3] if facts.count > 1 else (facts.where,)
    return _join([f"the {c}" for c in cells])


def size_adjective(facts: MaskFacts) -> str:
    """ "small", "medium-sized" or "large"."""
    return "medium-sized" if facts.size_word == "medium" else facts.size_word


def describe_size(facts: MaskFacts) -> str:
    """E.g. "about 40 x 12 px, 0.8 % of the image"."""
    return f"about {facts.box[0]} x {facts.box[1]} px, {100 * facts.fraction:.1f} % of the image"


def _description(noun: str, plural: str, obj: str, facts: MaskFacts | None, rng: np.random.Generator) -> str:
    if facts is None:
        return _pick(
            rng,
            (
                f"The {obj} shows {_article(noun)} {noun}; its extent is not marked in the annotation.",
                f"{_cap(_article(noun))} {noun} is present on the {obj}, but no region is outlined.",
            ),
        )
    where, size, adj = describe_location(facts), describe_size(facts), size_adjective(facts)
    if facts.count == 1:
        options = (
            f"{_cap(_article(adj))} {adj} {noun} is visible at {where} of the {obj} ({size}).",
            f"The {obj} has {_article(adj)} {adj} {noun} at {where} ({size}).",
            f"There is {_article(noun)} {noun} at {where} of the {obj}; it is {adj} ({size}).",
        )
    else:
        n = number_word(facts.count)
        options = (
            f"{_cap(n)} {plural} are visible on the {obj}, at {where}; together they are {adj} ({size}).",
            f"The {obj} shows {n} separate {plural} around {where}, spanning {size}.",
            f"There are {n} {plural} on the {obj}, mostly at the {facts.where}; the affected area is "
            f"{adj} ({size}).",
        )
    return _pick(rng, options)


def _severity(facts: MaskFacts | None, obj: str, rng: np.random.Generator) -> str:
    if facts is None:
        return f"Its size is unknown, so the {obj} should be checked by hand."
    return _pick(
        rng,
        {
            "small": (
                f"Because it is small ({100 * facts.fraction:.1f} % of the image), the effect on the {obj} "
                "may be limited, but it should not be ignored.",
                f"The affected area is small, so the {obj} may still be usable after a closer check.",
            ),
            "medium": (
                f"At {100 * facts.fraction:.1f} % of the image the affected area is significant and the "
                f"{obj} is likely to fail inspection.",
                f"The defect is of medium size, which makes the {obj} unreliable.",
            ),
            "large": (
                f"It covers a large part of the {obj} ({100 * facts.fraction:.1f} % of the image), so the "
                f"{obj} is most likely unusable.",
                f"Such a large defect makes the {obj} unfit for use.",
            ),
        }[facts.size_word],
    )


def _suggestion_action(facts: MaskFacts | None, obj: str, rng: np.random.Generator) -> str:
    word = facts.size_word if facts is not None else "medium"
    return _pick(
        rng,
        {
            "small": (
                f"Mark the {obj} for rework or a second inspection.",
                f"A small defect like this may be reworked; re-inspect the {obj} afterwards.",
            ),
            "medium": (
                f"Set the {obj} aside for a detailed inspection before it is used.",
                f"Hold the {obj} back and decide on rework or rejection after measuring the defect.",
            ),
            "large": (f"Reject the {obj}.", f"Scrap the {obj}; it cannot be repaired reliably."),
        }[word],
    )


def defect_answers(
    defect_type: str,
    mask: np.ndarray,
    class_name: str,
    rng: np.random.Generator,
    cfg: TextConfig = TextConfig(),
    category: DefectCategory | None = None,
) -> dict[str, str]:
    """The three RIAD answers (description, impact, suggestion; paper Sec. IV, V-A.2) of an anomalous
    image from its defect type and mask. ``category`` defaults to :func:`canonical_category`."""
    category = category or canonical_category(defect_type)
    name = defect_name(defect_type)
    noun, plural = category.noun, category.plural
    if category.name == "other" and name not in ("anomaly", "defect"):
        noun, plural = name, f"{name} regions"  # an unmapped source name is still the best word
    obj = object_name(class_name)
    facts = mask_facts(mask, cfg)
    description = _description(noun, plural, obj, facts, rng)
    impact = f"{_cap(_pick(rng, category.impacts))}. {_severity(facts, obj, rng)}"
    suggestion = f"{_suggestion_action(facts, obj, rng)} {_cap(_pick(rng, category.actions))}."
    return {"description": description, "impact": impact, "suggestion": suggestion}


def normal_description(class_name: str, rng: np.random.Generator) -> str:
    """The normal description of a class (used in the instruction text and by DSSL's Meta-Net, Eq. 13)."""
    obj = object_name(class_name)
    return _pick(
        rng,
        (
            f"A {obj} with an intact, uniform surface: no scratches, cracks, holes, stains or gaps.",
            f"A normal {obj}: its surface is clean and even, its edges are complete and nothing is deformed.",
            f"A defect-free {obj}, complete and clean, with a regular surface texture and no damage.",
        ),
    )


def normal_answers(class_name: str) -> dict[str, str]:
    """The answers of a normal image (OURS): no defect found, no impact, no action."""
    obj = object_name(class_name)
    return {
        "description": f"No defect was found: the {obj} looks normal.",
        "impact": f"No defect was found, so the function and appearance of the {obj} are not affected.",
        "suggestion": f"No action is needed; the {obj} can pass inspection.",
    }
