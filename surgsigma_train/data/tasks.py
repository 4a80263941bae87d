"""The 18 SurgΣ-DB tasks: what a text VLM trainer can train on, what it must exclude, and their label sets.

Registry names are what recipes, metrics and reports use; the integer task ids found in the data map onto them
through `data.task_ids` (schema.DEFAULT_TASK_IDS), because the released numbering is not confirmed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Group = Literal["understanding", "reasoning", "planning", "generation"]

# Official class names of the source data sets (Cholec80: Twinanda et al. 2016; CholecT50: Nwoye et al. 2022,
# label_mapping.txt order), the 10 basic actions of the SurgΣ annotation guide, and the 3 Strasberg criteria of
# the critical view of safety (Endoscapes C1-C3).
VOCABULARIES: dict[str, tuple[str, ...]] = {
    "cholec80_phases": ("Preparation", "CalotTriangleDissection", "ClippingCutting", "GallbladderDissection",
                        "GallbladderPackaging", "CleaningCoagulation", "GallbladderRetraction"),
    "cholec80_tools": ("Grasper", "Bipolar", "Hook", "Scissors", "Clipper", "Irrigator", "SpecimenBag"),
    "cholect50_instruments": ("grasper", "bipolar", "hook", "scissors", "clipper", "irrigator"),
    "cholect50_verbs": ("grasp", "retract", "dissect", "coagulate", "clip", "cut", "aspirate", "irrigate", "pack",
                        "null_verb"),
    "cholect50_targets": ("gallbladder", "cystic_plate", "cystic_duct", "cystic_artery", "cystic_pedicle",
                          "blood_vessel", "fluid", "abdominal_wall_cavity", "liver", "adhesion", "omentum",
                          "peritoneum", "gut", "specimen_bag", "null_target"),
    "basic_actions": ("aspiration", "clipping", "coagulation", "dissection", "knot-tying", "needle grasping",
                      "needle puncture", "packaging", "suture pulling", "tissue retraction"),
    "cvs_criteria": ("two structures", "hepatocystic triangle", "cystic plate"),
}


@dataclass(frozen=True)
class Task:
    name: str
    group: Group
    modality: Literal["image", "video"]  # input; planning tasks never see footage after their cutoff
    answer_kind: str  # label | label_list | triplets | cvs_criteria | boxes_* | free_text | seconds | generated media
    vocabularies: tuple[str, ...] = ()  # VOCABULARIES names of its labels, where known (empty: open or unknown)

    @property
    def trainable(self) -> bool:
        """Generation tasks need an image/video generator; a text VLM cannot learn them."""
        return self.group != "generation"


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("instrument_recognition", "understanding", "image", "label_list", ("cholec80_tools",)),
        Task("instrument_localization", "understanding", "image", "boxes_0_1000"),
        Task("tissue_recognition", "understanding", "image", "label_list"),
        Task("tissue_localization", "understanding", "image", "boxes_unit"),
        Task("phase_recognition", "understanding", "image", "label", ("cholec80_phases",)),
        Task("step_recognition", "understanding", "image", "label"),  # RARP steps: label set not published
        Task("action_recognition", "understanding", "video", "label", ("basic_actions",)),
        Task("triplet_recognition", "understanding", "image", "triplets",
             ("cholect50_instruments", "cholect50_verbs", "cholect50_targets")),
        Task("safety_assessment", "reasoning", "image", "cvs_criteria", ("cvs_criteria",)),
        Task("image_captioning", "understanding", "image", "free_text"),
        Task("video_captioning", "understanding", "video", "free_text"),
        Task("action_remaining_time", "planning", "video", "seconds"),
        Task("next_action_planning", "planning", "video", "label", ("basic_actions",)),
        Task("desmoking", "generation", "image", "image"),
        Task("instrument_segmentation", "generation", "image", "mask"),
        Task("depth_estimation", "generation", "image", "depth_map"),
        Task("next_frame_prediction", "generation", "image", "image"),
        Task("conditional_video_generation", "generation", "video", "video"),
    )
}


def get_task(name: str) -> Task | None:
    return TASKS.get(name)


def vocabulary(name: str) -> tuple[str, ...]:
    """One label set by name (KeyError names the known ones)."""
    if name not in VOCABULARIES:
        raise KeyError(f"no vocabulary {name!r} (known: {', '.join(VOCABULARIES)})")
    return VOCABULARIES[name]


def task_vocabularies(task_name: str) -> dict[str, tuple[str, ...]]:
    """The label sets of a task, by vocabulary name; empty for open-answer tasks or unknown names."""
    task = TASKS.get(task_name)
    return {v: VOCABULARIES[v] for v in task.vocabularies} if task else {}


# Words of a label or answer: CamelCase, snake_case, kebab-case and spaced forms all give the same words.
_WORD_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.lower() for w in _WORD_RE.findall(text))


def mentioned_labels(answer: str, labels: tuple[str, ...] | list[str]) -> list[str]:
    """The labels an answer mentions, in the order they first appear in it.

    Matching is on whole words, ignoring case and `_`/`-`/space/CamelCase boundaries: "Calot triangle
    dissection" mentions CalotTriangleDissection, "null verb" mentions null_verb, but "grasper" does not
    mention the verb "grasp" and "clipping" does not mention "clip".
    """
    words = _words(answer)
    found = []
    for label in labels:
        target = _words(label)
        n = len(target)
        first = next((i for i in range(len(words) - n + 1) if words[i:i + n] == target), None) if n else None
        if first is not None:
            found.append((first, label))
    return [label for _, label in sorted(found, key=lambda f: f[0])]
